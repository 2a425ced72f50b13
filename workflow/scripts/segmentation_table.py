"""Rule segmentation_table: one metric of one task across arms -> tables + box plots."""

from pathlib import Path

import pandas as pd

from brainsynth.io import run_main
from brainsynth.metrics import FP_TUM_METRIC, read_long
from brainsynth.tables import boxplot, fp_tum_plot, write_tables


def main(sm):
    task, metric = sm.wildcards.task, sm.wildcards.metric
    df = pd.concat([read_long(p) for p in sm.input], ignore_index=True)
    df = df[df["metric"] == metric].copy()
    # one column per (class, test set): the domain-shift comparison sits side by side
    order = [f"{c} ({ts})" for c in dict.fromkeys(df["class"]) for ts in sm.params.test_sets]
    df["class"] = df["class"] + " (" + df["test_set"] + ")"
    order = [c for c in order if c in set(df["class"])]
    kw = dict(arms_order=sm.params.arms, reference_arm=sm.params.reference_arm, test=sm.params.test,
              alpha=sm.params.alpha)
    written = write_tables(df, Path(sm.output.csv).parent, metrics=[metric], classes=order, by=["task"], **kw)
    paths = written[f"{task}_{metric}"]
    for key in ("csv", "md", "tex", "pvalues"):
        if Path(paths[key]).resolve() != Path(sm.output[key]).resolve():
            raise RuntimeError(f"table written to {paths[key]}, expected {sm.output[key]}")
    title = f"{task}: {metric} by arm (test set in brackets)"
    if metric == FP_TUM_METRIC:
        fp_tum_plot(df, sm.output.figure, title=title, **kw)
    else:
        boxplot(df, metric, sm.output.figure, classes=order, title=title, **kw)


run_main(main, snakemake)  # noqa: F821
