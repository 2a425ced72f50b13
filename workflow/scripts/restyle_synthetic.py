"""Rule restyle_synthetic: the synthetic label maps imaged in another style set's styles."""

from brainsynth.generators.brainspade.sampling import restyle_synthetic
from brainsynth.io import run_main


def main(sm):
    restyle_synthetic(image_generator=sm.input.image_generator, samples_dir=sm.params.samples,
                      subjects=sm.params.subjects, style_subjects=list(sm.params.styles), out_dir=sm.params.out,
                      reference=sm.input.reference, seed=sm.params.seed,
                      modalities=sm.params.get("modalities"))


run_main(main, snakemake)  # noqa: F821
