"""Rule synthetic_sample_qc: per-sample flags of the synthetic subjects."""

import logging
from pathlib import Path

import pandas as pd

from brainsynth.generators.label_quality import synthetic_sample_qc
from brainsynth.io import run_main, save_table
from brainsynth.labels import LabelSchema

log = logging.getLogger("brainsynth")


def main(sm):
    manifest = pd.read_csv(sm.input.manifest, sep="\t", dtype={"subject": str})
    labels = {Path(p).parent.name: p for p in sm.input.labels}
    qc = synthetic_sample_qc(manifest, labels, dict(sm.params.training), dict(sm.params.held_out),
                             LabelSchema.from_config({"labels": sm.params.labels}))
    save_table(qc, sm.output.qc)
    log.info("synthetic sample QC: %d of %d flagged (missed conditioning %d, tissue out of range %d, "
             "lesion volume out of range %d, near copy %d)", int(qc["flagged"].sum()), len(qc),
             int(qc["missed_conditioning"].sum()), int(qc["tissue_out_of_range"].sum()),
             int(qc["lesion_out_of_range"].sum()), int(qc["near_copy"].sum()))


run_main(main, snakemake)  # noqa: F821
