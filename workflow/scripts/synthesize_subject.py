"""Rule synthesize_subject: one demo subject in native space."""

import logging

from brainsynth.demo import synthesize_subject
from brainsynth.io import run_main


def main(sm):
    info = synthesize_subject(sm.params.row, sm.params.demo, sm.params.labels, sm.params.seed,
                              dict(sm.output.items()), atlas=sm.input.atlas)
    logging.getLogger("brainsynth").info(
        "%s: shape %s, voxel %s mm, lesion voxels %s", sm.wildcards.subject, info["shape"],
        info["voxel_mm"], info["lesion_voxels"])


run_main(main, snakemake)  # noqa: F821
