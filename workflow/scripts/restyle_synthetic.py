"""Rule restyle_synthetic: the synthetic label maps imaged in another style set's styles."""

from pathlib import Path

from brainsynth.generators.sampling import restyle_synthetic
from brainsynth.io import run_main


def main(sm):
    grid = Path(sm.input.reference).parents[1] / "preprocessing" / "grid"
    styles = [{"subject": s, **{m: str(grid / s / f"{m}.nii.gz") for m in sm.params.modalities}}
              for s in sm.params.style_subjects]
    restyle_synthetic(image_generator=sm.input.image_generator, samples_dir=sm.params.samples,
                      subjects=sm.params.subjects, style_subjects=styles, out_dir=sm.params.out,
                      reference=sm.input.reference, seed=sm.params.seed)


run_main(main, snakemake)  # noqa: F821
