"""Rule train_label_ldm: train (or resume) the conditioned latent diffusion model."""

from brainsynth.generators.brainspade.label_generator import train_label_ldm
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    cfg = dict(sm.params.cfg)
    cfg.setdefault("num_threads", sm.threads)
    train_label_ldm(sm.input.vae, list(sm.params.preprocessed), sm.input.conditioning, cfg, sm.params.out,
                    subjects=list(sm.params.subjects),
                    schema=LabelSchema.from_config({"labels": sm.params.labels}))


run_main(main, snakemake)  # noqa: F821
