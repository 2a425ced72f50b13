"""Rule score_segmentation: predictions of one (task, arm) vs ground truth -> long TSV."""

import logging

import nibabel as nib
import numpy as np
import pandas as pd

from brainsynth import experiment as design
from brainsynth.io import run_main, save_table
from brainsynth.metrics import score_cohort

log = logging.getLogger("brainsynth")


def main(sm):
    groups = sm.params.classes
    inverse = design.inverse_lut(groups)  # task label -> schema value
    manifest = pd.concat([pd.read_csv(p, sep="\t", dtype=str) for p in sm.input.predictions])
    predictions = dict(zip(zip(manifest["test_set"], manifest["subject"]), manifest["prediction"]))
    pairs = []
    for rec, truth in zip(sm.params.subjects, sm.params.preprocessed):
        pred = predictions[(rec["test_set"], rec["subject"])]
        arr = design.apply_lut(np.asarray(nib.load(pred).dataobj), inverse, what=pred)
        pairs.append({**rec, "pred": arr, "truth": truth})
    df = score_cohort(pairs, groups, with_hd95=sm.params.hd95, fp_tum=sm.params.fp_tum,
                      hd95_definition=sm.params.hd95_definition,
                      experiment=sm.params.experiment, arm=sm.wildcards.arm, task=sm.wildcards.task)
    save_table(df, sm.output[0])
    dice = df[df["metric"] == "dice"].groupby(["test_set", "class"], sort=False)["value"].mean()
    log.info("mean Dice %s/%s:\n%s", sm.wildcards.task, sm.wildcards.arm, dice.round(3).to_string())


run_main(main, snakemake)  # noqa: F821
