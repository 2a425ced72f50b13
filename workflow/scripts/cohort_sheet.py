"""Rule cohort_sheet: write the demo cohort as a standard sample sheet."""

from pathlib import Path

from brainsynth.io import run_main
from brainsynth.sheet import write_sheet


def main(sm):
    df = sm.params.subjects.copy()
    cohort = Path(sm.output[0]).parent.resolve()
    for col in list(sm.params.modalities) + ["label", "brain_mask"]:
        df[col] = [str(cohort / s / f"{col}.nii.gz") for s in df["subject"]]
    write_sheet(df, sm.output[0])


run_main(main, snakemake)  # noqa: F821
