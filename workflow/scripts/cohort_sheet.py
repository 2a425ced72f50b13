"""Rule cohort_sheet: write the demo cohort as a standard sample sheet."""

from pathlib import Path

from brainsynth.io import run_main
from brainsynth.sheet import site_modalities_of, write_sheet


def main(sm):
    df = sm.params.subjects.copy()
    cohort = Path(sm.output[0]).parent.resolve()
    mods = list(sm.params.modalities)
    for col in mods + ["label", "brain_mask"]:
        df[col] = [
            str(cohort / s / f"{col}.nii.gz")
            if col not in mods or col in site_modalities_of(site, mods, sm.params.site_modalities)
            else None
            for s, site in zip(df["subject"], df["site"])
        ]
    write_sheet(df, sm.output[0])


run_main(main, snakemake)  # noqa: F821
