"""Rule value_curve: Dice against the synthetic:real ratio and the real fraction, per generator."""

import pandas as pd

from brainsynth import generator_benchmark as gen_bench
from brainsynth.io import run_main


def main(sm):
    scores = pd.concat([pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in sm.input.scores])
    gen_bench.write_value_curve(scores, dict(sm.params.arms), sm.params.task, sm.params.test_set,
                                {k: sm.output[k] for k in ("csv", "md", "tex", "figure")})


run_main(main, snakemake)  # noqa: F821
