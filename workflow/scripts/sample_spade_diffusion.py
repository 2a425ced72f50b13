"""Rule sample_spade_diffusion: a sample set's label maps imaged by the SPADE diffusion model."""

from brainsynth.generators.common import set_threads
from brainsynth.generators.spade_diffusion import sample_spade_diffusion
from brainsynth.io import run_main


def main(sm):
    set_threads(sm.threads)
    sample_spade_diffusion(model=sm.input.model, label_paths=dict(zip(sm.params.subjects, sm.input.labels)),
                           out_dir=sm.params.out, modalities=list(sm.params.modalities), seed=sm.params.seed,
                           steps=sm.params.inference_steps, device=sm.params.device)


run_main(main, snakemake)  # noqa: F821
