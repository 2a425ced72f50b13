"""Rule qc_table: per-subject QC records -> qc.tsv, and the subjects failing a check -> qc_failed.tsv."""

import logging

from brainsynth.io import run_main, save_table
from brainsynth.qc import qc_table


def main(sm):
    files = list(sm.params.preprocessed)
    half = len(files) // 2  # skull-strip records, then co-registration records
    df = qc_table(files[:half], sm.output.table, min_dice=sm.params.min_dice, coregistration_paths=files[half:],
                  min_coregistration_dice=sm.params.min_coregistration_dice)
    failed = df.loc[df["qc_pass"] == "no", ["subject", "qc_failures"]]
    save_table(failed, sm.output.failed)
    log = logging.getLogger("brainsynth")
    d = df["skull_strip_dice"].dropna() if "skull_strip_dice" in df else []
    if len(d):
        log.info("skull-strip Dice: mean %.3f, min %.3f over %d subjects", d.mean(), d.min(), len(d))
    log.info("%d of %d subjects fail QC%s", len(failed), len(df),
             "".join(f"\n  {s}: {f}" for s, f in zip(failed["subject"], failed["qc_failures"])))


run_main(main, snakemake)  # noqa: F821
