"""Rule generator_quality: one generator's samples on the synthesis audit's measures."""

import pandas as pd

from brainsynth.generators.benchmark_quality import conditioning_table, generator_quality
from brainsynth.io import run_main, save_table
from brainsynth.labels import LabelSchema


def main(sm):
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    manifest = pd.read_csv(sm.input.manifest, sep="\t", dtype={"subject": str})
    table = generator_quality({s: dict(v) for s, v in sm.params.samples.items()},
                              conditioning_table(manifest, schema),
                              {s: dict(v) for s, v in sm.params.training.items()}, dict(sm.params.held_out),
                              list(sm.params.modalities), schema)
    save_table(table, sm.output[0])


run_main(main, snakemake)  # noqa: F821
