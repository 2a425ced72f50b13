"""Rule validate_inputs: check all subjects' files; write the summary only when all is well."""

import pandas as pd

from brainsynth.io import run_main, save_table
from brainsynth.labels import LabelSchema
from brainsynth.validate import validate_cohort


def main(sm):
    df = pd.DataFrame.from_records(sm.params.subjects)
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    summary = validate_cohort(df, sm.params.modalities, schema, label_maps=sm.params.label_maps,
                              site_modalities=sm.params.site_modalities)
    save_table(summary, sm.output[0])


run_main(main, snakemake)  # noqa: F821
