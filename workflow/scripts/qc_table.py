"""Rule qc_table: per-subject QC records -> one TSV."""

from brainsynth.io import run_main
from brainsynth.qc import qc_table


def main(sm):
    df = qc_table(list(sm.params.preprocessed), sm.output[0], min_dice=sm.params.min_dice)
    if "skull_strip_dice" in df:
        d = df["skull_strip_dice"].dropna()
        if len(d):
            import logging

            logging.getLogger("brainsynth").info(
                "skull-strip Dice: mean %.3f, min %.3f over %d subjects", d.mean(), d.min(), len(d))


run_main(main, snakemake)  # noqa: F821
