"""Rule skull_strip: propagate the template brain mask into native space, then QC it."""

from brainsynth import preprocess as pp
from brainsynth.io import run_main


def main(sm):
    pp.set_threads(sm.threads)
    cfg = sm.params.skull_strip
    pp.skull_strip(sm.input.t1, sm.input.template_mask, sm.input.affine, sm.input.inverse_warp,
                   sm.output.mask, threshold=cfg["threshold"], closing_voxels=cfg["closing_voxels"])
    rec = pp.skull_strip_qc(sm.output.mask, sm.input.get("truth"), sm.output.qc, sm.wildcards.subject)
    pp.log.info("skull strip QC: %s", rec)


run_main(main, snakemake)  # noqa: F821
