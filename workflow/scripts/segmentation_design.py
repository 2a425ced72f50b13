"""Rule segmentation_design: the planned arms of every task as one table."""

import pandas as pd

from brainsynth.io import run_main, save_table


def main(sm):
    save_table(pd.DataFrame(list(sm.params.rows)), sm.output[0])


run_main(main, snakemake)  # noqa: F821
