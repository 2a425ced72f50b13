"""Rule train_image_generator: train (or resume) the SPADE VAE-GAN."""

from brainsynth.generators.image_generator import train_image_generator
from brainsynth.io import run_main


def main(sm):
    cfg = dict(sm.params.cfg)
    cfg.setdefault("num_threads", sm.threads)
    n = sm.params.n_subjects
    images = list(sm.input.images)
    by_modality = {m: images[i * n:(i + 1) * n] for i, m in enumerate(sm.params.modalities)}
    train_image_generator(list(sm.input.tissue), by_modality, cfg, sm.params.out)


run_main(main, snakemake)  # noqa: F821
