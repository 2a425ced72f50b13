"""Rule synthetic_label_consistency: a task's real-data model on the synthetic images."""

import logging

import nibabel as nib
import numpy as np
import pandas as pd

from brainsynth import experiment as design
from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_table
from brainsynth.label_consistency import consistency_table, requested_samples
from brainsynth.labels import LabelSchema
from brainsynth.metrics import score_cohort

log = logging.getLogger("brainsynth")


def main(sm):
    written = seg.predict_for_rule(sm.input.model, sm.params.cases, sm.output.predictions, sm.log[0],
                                   device=sm.params.device, tile_step_size=sm.params.tile_step_size,
                                   use_mirroring=sm.params.use_mirroring, threads=sm.threads)
    inverse = design.inverse_lut(sm.params.classes)  # task label -> schema value
    pairs = [{"subject": c["case_id"], "truth": c["label"],
              "pred": design.apply_lut(np.asarray(nib.load(written[c["case_id"]]).dataobj), inverse,
                                       what=written[c["case_id"]])}
             for c in sm.params.cases]
    synthetic = score_cohort(pairs, sm.params.classes, arm=sm.params.arm, task=sm.wildcards.task,
                             test_set="synthetic")
    real = pd.read_csv(sm.input.scores, sep="\t", dtype={"subject": str})
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    requested = requested_samples(pd.read_csv(sm.input.manifest, sep="\t", dtype={"subject": str}),
                                  sm.params.classes, schema.lesion_type_values)
    table = consistency_table(synthetic, real, sm.wildcards.task, sm.params.arm, sm.params.real_test_set,
                              sm.params.max_gap, requested=requested)
    save_table(table, sm.output.table)
    log.info("label consistency of %s (model %s):\n%s", sm.wildcards.task, sm.params.arm,
             table[["class", "subset", "synthetic_dice", "n_synthetic", "real_dice", "gap", "pass"]].round(3).to_string())


run_main(main, snakemake)  # noqa: F821
