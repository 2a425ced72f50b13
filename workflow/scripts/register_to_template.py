"""Rule register_to_template: affine + SyN of the N4-corrected T1 to the template T1."""

from brainsynth import preprocess as pp
from brainsynth.io import run_main


def main(sm):
    pp.set_threads(sm.threads)
    cfg = sm.params.registration
    pp.register(
        sm.input.t1, sm.input.template,
        sm.output.affine, sm.output.warp, sm.output.inverse_warp, sm.output.warped,
        transform=cfg["transform"], syn_iterations=cfg["syn_iterations"],
        affine_iterations=cfg["affine_iterations"], seed=sm.params.seed,
    )


run_main(main, snakemake)  # noqa: F821
