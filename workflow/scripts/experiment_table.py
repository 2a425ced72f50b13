"""Rule experiment_table: one experiment of the study -> its table (csv/md/tex), p-values, figure."""

import pandas as pd

from brainsynth.io import run_main
from brainsynth.metrics import HD95_DEFINITIONS, read_long
from brainsynth.study_tables import experiment_figure, write_experiment

METRIC_DEFINITIONS = ("Dice, precision, recall: voxel overlap per subject (empty truth and prediction: 1); "
                      "fp_tum: share of true tumour voxels predicted as the task's lesion.")


def main(sm):
    spec = sm.params.definition
    df = pd.concat([read_long(p) for p in sm.input], ignore_index=True)
    arms, test_sets = list(spec["arms"]), list(spec["test_sets"])
    metrics = spec.get("metrics") or ["dice"]
    title = spec.get("title") or sm.wildcards.experiment
    definitions = METRIC_DEFINITIONS + " " + HD95_DEFINITIONS[sm.params.hd95_definition] + "."
    _, pvalues = write_experiment(df, dict(sm.output.items()), arms, test_sets, metrics, title,
                                  reference_arm=spec.get("reference_arm"),
                                  upper_bound_arms=spec.get("upper_bound_arms") or [], test=sm.params.test,
                                  alpha=sm.params.alpha, metric_definitions=definitions)
    experiment_figure(df, sm.output.figure, arms, test_sets, metrics, title, pvalues=pvalues, alpha=sm.params.alpha,
                      reference_arm=spec.get("reference_arm") or arms[0])


run_main(main, snakemake)  # noqa: F821
