"""Rule inputs_validated: the cohort check passed; its table, copied (one-input relay, see
workflow/rules/preprocessing.smk)."""

import shutil

from brainsynth.io import atomic_path

sm = snakemake  # noqa: F821
with atomic_path(sm.output[0]) as tmp:
    shutil.copyfile(sm.input[0], tmp)
with open(sm.log[0], "w") as f:
    f.write(f"{sm.input[0]} -> {sm.output[0]}\n")
