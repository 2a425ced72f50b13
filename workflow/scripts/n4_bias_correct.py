"""Rule n4_bias_correct: N4 on every modality of one subject."""

from brainsynth import preprocess as pp
from brainsynth.io import run_main


def main(sm):
    pp.set_threads(sm.threads)
    cfg = sm.params.n4
    for src, dst in zip(sm.input.images, sm.output):
        pp.log.info("N4 %s -> %s", src, dst)
        pp.n4_correct(src, dst, shrink_factor=cfg["shrink_factor"], iterations=cfg["iterations"])


run_main(main, snakemake)  # noqa: F821
