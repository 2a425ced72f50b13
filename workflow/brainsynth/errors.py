"""Errors a user can act on.

Every problem with user input is raised as :class:`InputError`, whose message
names the subject, the file, the field and the fix. Rule scripts catch it and
print it without a traceback (see :func:`brainsynth.io.run_main`).
"""


class InputError(ValueError):
    """Bad user input: the message says what is wrong and how to fix it."""

    def __init__(self, problem, *, subject=None, file=None, field=None, fix=None):
        self.problem = problem
        self.subject = subject
        self.file = file
        self.field = field
        self.fix = fix
        parts = []
        if subject is not None:
            parts.append(f"subject {subject!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        if file is not None:
            parts.append(f"file {str(file)!r}")
        where = ", ".join(parts)
        msg = f"{where}: {problem}" if where else str(problem)
        if fix:
            msg += f" -> fix: {fix}"
        super().__init__(msg)


class InputErrors(InputError):
    """Several input problems, reported together so a user fixes them in one go."""

    def __init__(self, errors):
        self.errors = list(errors)
        lines = [f"{len(self.errors)} input problem(s):"] + [f"  - {e}" for e in self.errors]
        ValueError.__init__(self, "\n".join(lines))
