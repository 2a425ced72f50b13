"""Rule lesion_proportions: dc_jl conditioning values for the label generator."""

import json

from brainsynth import preprocess as pp
from brainsynth.io import run_main, save_table
from brainsynth.labels import LabelSchema


def main(sm):
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    records = [json.loads(open(p).read()) for p in sm.params.preprocessed]
    save_table(pp.lesion_proportions(records, schema), sm.output[0])


run_main(main, snakemake)  # noqa: F821
