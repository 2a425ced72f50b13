"""Rule predict_segmentation: one (task, arm) model on one test set."""

import logging

import pandas as pd

from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_table

log = logging.getLogger("brainsynth")


def main(sm):
    expected = seg.predict_for_rule(sm.input.model, sm.params.cases, sm.output.predictions, sm.log[0],
                                    device=sm.params.device, tile_step_size=sm.params.tile_step_size,
                                    use_mirroring=sm.params.use_mirroring, threads=sm.threads)
    log.info("%s: %d cases predicted into %s", sm.wildcards.test_set, len(expected), sm.output.predictions)
    save_table(pd.DataFrame([{"subject": c["case_id"], "test_set": c["test_set"],
                              "prediction": str(expected[c["case_id"]])} for c in sm.params.cases]),
               sm.output.manifest)


run_main(main, snakemake)  # noqa: F821
