"""Rule demo_atlas: the 1 mm MNI152 atlas of the demo cohort, written once for every subject."""

import logging

from brainsynth.io import run_main
from brainsynth.template import load_atlas, save_atlas


def main(sm):
    atlas = load_atlas()
    save_atlas(sm.output[0], atlas)
    logging.getLogger("brainsynth").info("atlas %s at 1 mm -> %s", atlas.shape, sm.output[0])


run_main(main, snakemake)  # noqa: F821
