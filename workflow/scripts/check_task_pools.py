"""Rule check_task_pools: every (task, arm) can see foreground of its task, from the label maps' contents."""

import pandas as pd

from brainsynth import experiment as design
from brainsynth.io import run_main, save_table


def main(sm):
    classes = design.classes_from_input_check(sm.input[0], sm.params.tissues)
    rows = design.check_task_pools(sm.params.pools, classes)
    save_table(pd.DataFrame(rows, columns=["task", "arm", "real_with_foreground",
                                           "generator_subjects_with_foreground"]), sm.output[0])


run_main(main, snakemake)  # noqa: F821
