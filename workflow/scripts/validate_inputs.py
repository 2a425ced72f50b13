"""Rule validate_inputs: check one subject's files; write a marker only when all is well."""

from pathlib import Path

from brainsynth.errors import InputErrors
from brainsynth.io import atomic_path, run_main
from brainsynth.labels import LabelSchema
from brainsynth.validate import check_subject


def main(sm):
    row = {"subject": sm.wildcards.subject, **dict(sm.input.items())}
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    errors = check_subject(row, sm.params.modalities, schema, label_map=sm.params.label_map)
    if errors:
        raise InputErrors(errors)
    with atomic_path(sm.output[0]) as tmp:
        Path(tmp).write_text("".join(f"{k}\t{v}\n" for k, v in row.items()))


run_main(main, snakemake)  # noqa: F821
