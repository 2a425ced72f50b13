"""Atomic output writing and the entry point wrapper used by rule scripts.

Outputs are written to a temporary file in the destination directory and moved
into place with :func:`os.replace`, so a killed job never leaves a file that
looks complete (at worst a hidden ``.<name>.<random><suffix>`` temporary, which
no rule reads; the next write of that output removes it).
Before a script runs, :func:`run_main` checks the job's input files that the
workflow made (see :mod:`brainsynth.integrity`): a damaged one is moved aside and
named, never silently used.
"""

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

log = logging.getLogger("brainsynth")


def current_umask():
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, scripts are single-threaded here)
    os.umask(mask)
    return mask


# The random part of a temporary name never follows a dot: ANTs decides whether a transform path
# is a displacement-field image or a transform file by looking for ".h5", ".mat", ".txt", ".xfm"
# anywhere in it, so a folder ".demo038.h5imclqv.tmpdir" (1 in 1369 random names) made it drop a
# subject's SyN warp (2026-12-04). Names of earlier versions (no "tmp-") are still recognised.
_TMP_MARK = "tmp-"


def _temporary_pattern(path, suffix):
    # tempfile.mkstemp names: prefix + 8 characters of [a-z0-9_] + suffix
    return re.compile(re.escape(f".{path.name}.") + f"(?:{_TMP_MARK})?" + r"[a-z0-9_]{8}" + re.escape(suffix) + "$")


def remove_stale_temporaries(path, suffix=None):
    """Delete temporaries of ``path`` (files, or folders of :func:`atomic_dir`) left by a killed
    :func:`atomic_path` / :func:`atomic_dir` writer.

    Snakemake never runs two jobs writing the same output at once, so any such
    file is a leftover of an earlier, interrupted job. Returns the removed paths.
    """
    path = Path(path)
    suffix = suffix if suffix is not None else ("".join(path.suffixes) or ".tmp")
    pattern = _temporary_pattern(path, suffix)
    removed = []
    if path.parent.is_dir():
        for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
            if pattern.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    The file gets the permissions a plain ``open(path, "w")`` would give
    (``0o666`` minus the umask), not :func:`tempfile.mkstemp`'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


_DIR_SUFFIX = ".tmpdir"


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder next to ``path``; move it onto ``path`` on success.

    For rules whose output is a whole folder (one preprocessed subject): a killed
    job leaves only a hidden ``.<name>.<random>.tmpdir`` (removed by the next
    writer), never a half-filled folder under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, _DIR_SUFFIX)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP_MARK}", suffix=_DIR_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_nifti(array, affine, path, dtype=None, header=None):
    """Write ``array`` as NIfTI atomically; ``dtype`` defaults to the array's."""
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_data_dtype(arr.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_table(df, path, **kwargs):
    """Write a pandas DataFrame as TSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, **kwargs)
    return Path(path)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def save_figure(fig, path, **kwargs):
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    plt.close(fig)
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def setup_logging(log_file=None, level=logging.INFO):
    """Log to stderr and, when given, to the rule's log file."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def run_main(func, snakemake_obj=None, check_inputs=True):
    """Run a rule script's ``func(snakemake)``; user errors end with a clear message.

    First (``check_inputs``) every input file of the job that the workflow made
    (under ``results/``), and every preprocessed subject file it reads
    (``params.preprocessed``: files inside the per-subject folders, which
    Snakemake tracks as whole folders), is checked with :func:`brainsynth.integrity.verify_inputs`:
    a damaged one is moved aside to ``<file>.corrupt`` and reported, so the next
    run rebuilds it. An :class:`InputError` is printed as one line (no
    traceback) and the process exits 1, so Snakemake marks the job failed and
    removes its outputs.
    """
    log_file = None
    if snakemake_obj is not None and len(snakemake_obj.log):
        log_file = str(snakemake_obj.log[0])
    setup_logging(log_file)
    try:
        if check_inputs and snakemake_obj is not None:
            from .integrity import verify_inputs

            verify_inputs([str(f) for f in snakemake_obj.input]
                          + [str(f) for f in getattr(snakemake_obj.params, "preprocessed", [])])
        func(snakemake_obj)
    except InputError as exc:
        log.error("%s", exc)
        sys.stderr.write(f"ERROR: {exc}\n")
        sys.exit(1)
