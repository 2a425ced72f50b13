"""Rule generator_benchmark: downstream Dice and compute per generator, one table and figure."""

import pandas as pd

from brainsynth import generator_benchmark as gen_bench
from brainsynth.io import run_main


def main(sm):
    scores = pd.concat([pd.read_csv(p, sep="\t", dtype={"subject": str}) for p in sm.input.scores])
    compute = {g: gen_bench.generator_compute(j["training"], j["sampling"], j["n"], sm.params.benchmarks)
               for g, j in sm.params.generators.items()}
    fid = {tuple(key.split("/")): pd.read_csv(path, sep="\t") for key, path in sm.params.fid.items()}
    quality = {g: pd.read_csv(path, sep="\t") for g, path in sm.params.quality.items()}
    gen_bench.write_benchmark(scores, list(sm.params.comparisons), dict(sm.params.arms), compute,
                              {k: sm.output[k] for k in ("csv", "md", "tex", "figure")}, fid=fid, quality=quality,
                              task_modalities={t: list(m) for t, m in sm.params.task_modalities.items()})


run_main(main, snakemake)  # noqa: F821
