"""Rule preprocessed_subjects: the table of one split's preprocessed subjects and their files."""

from brainsynth import preprocess as pp
from brainsynth.io import run_main


def main(sm):
    pp.preprocessed_manifest(sm.params.rows, sm.params.modalities, sm.output[0])


run_main(main, snakemake)  # noqa: F821
