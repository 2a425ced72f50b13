# Generator benchmark: per generator, downstream Dice of the arms that draw from it against a
# real reference arm (generator_benchmark.comparisons), with its compute from the benchmark
# files of its jobs (results/<experiment>/benchmarks/generators/). Off when no comparison.
rule generator_benchmark:
    """Downstream Dice per generator against the real reference arm, and each generator's compute."""
    input:
        scores=[
            f"{SEG}/{t}/{a}/scores.tsv"
            for t, a in dict.fromkeys(
                (c["task"], a) for c in BENCH_COMPARISONS for a in [c["reference"], *c["arms"]]
            )
        ],
    output:
        csv=report(
            f"{R}/benchmark/generators.csv",
            caption="../report/generator_benchmark.rst",
            category="Benchmark",
        ),
        md=f"{R}/benchmark/generators.md",
        tex=f"{R}/benchmark/generators.tex",
        figure=report(
            f"{R}/benchmark/generators.png",
            caption="../report/generator_benchmark.rst",
            category="Benchmark",
        ),
    params:
        comparisons=BENCH_COMPARISONS,
        arms={
            a: {
                "generator": SEG_DESIGN["generators"][a],
                "n_real": len(SEG_DESIGN["cases"][a]["real"]),
                "n_synthetic": len(SEG_DESIGN["cases"][a]["synthetic"]),
            }
            for a in BENCH_ARMS
        },
        generators=benchmark_generators(),
        benchmarks=BENCH,
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/benchmark/generator_benchmark.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/generator_benchmark.py"
