"""Rule train_image_generator: train (or resume) the SPADE VAE-GAN."""

from brainsynth.generators.brainspade.image_generator import train_image_generator
from brainsynth.io import run_main


def main(sm):
    cfg = dict(sm.params.cfg)
    cfg.setdefault("num_threads", sm.threads)
    by_modality = {m: list(paths) for m, paths in sm.params.images.items()}
    train_image_generator(list(sm.params.tissue), by_modality, cfg, sm.params.out)


run_main(main, snakemake)  # noqa: F821
