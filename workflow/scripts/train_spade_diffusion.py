"""Rule train_spade_diffusion: train (or resume) the SPADE diffusion image generator."""

from brainsynth.generators.spade_diffusion import train_spade_diffusion
from brainsynth.io import run_main


def main(sm):
    cfg = dict(sm.params.cfg)
    cfg.setdefault("num_threads", sm.threads)
    train_spade_diffusion(list(sm.params.tissue), {m: list(p) for m, p in sm.params.images.items()}, cfg,
                          sm.params.out)


run_main(main, snakemake)  # noqa: F821
