"""Rule synthesis_quality: synthetic vs real image-quality and memorisation tables."""

from pathlib import Path

from brainsynth.generators.quality import evaluate_quality
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    mods = sm.params.modalities
    syn_dir = Path(sm.input.samples[0]).parents[1]
    synthetic = [{"subject": s, "labelprob": str(syn_dir / s / "labelprob.nii.gz"),
                  **{m: str(syn_dir / s / f"{m}.nii.gz") for m in mods}} for s in sm.params.synthetic]
    real = list(sm.params.real)
    evaluate_quality(synthetic, real, mods, Path(sm.output.metrics).parent,
                     schema=LabelSchema.from_config({"labels": sm.params.labels}))


run_main(main, snakemake)  # noqa: F821
