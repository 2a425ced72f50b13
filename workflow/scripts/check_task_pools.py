"""Rule check_task_pools: every (task, arm) can see foreground of its task, from the label maps' contents."""

import pandas as pd

from brainsynth import experiment as design
from brainsynth.io import run_main, save_table


def main(sm):
    checked = pd.read_csv(sm.input[0], sep="\t", dtype=str, keep_default_na=False)
    classes = {row["subject"]: design.subject_classes(row["label_classes"], row["tissue_from"] == "atropos",
                                                      sm.params.tissues)
               for _, row in checked.iterrows()}
    rows = design.check_task_pools(sm.params.pools, classes)
    save_table(pd.DataFrame(rows, columns=["task", "arm", "real_with_foreground",
                                           "generator_subjects_with_foreground"]), sm.output[0])


run_main(main, snakemake)  # noqa: F821
