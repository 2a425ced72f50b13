# Generator benchmark: per generator, downstream Dice of the arms that draw from it against a
# real reference arm (generator_benchmark.comparisons), with its compute from the benchmark
# files of its jobs (results/<experiment>/benchmarks/generators/). Off when no comparison.
from brainsynth import generator_benchmark as gen_bench
from brainsynth.errors import InputErrors

BENCH_COMPARISONS = (config.get("generator_benchmark") or {}).get("comparisons") or []
_problems = gen_bench.check_comparisons(
    BENCH_COMPARISONS,
    {t: seg_task_arms(t) for t in SEG_TASKS},
    {t: list(SEG_DESIGN["task_inputs"][t][1]) for t in SEG_TASKS},
)
if _problems:
    raise WorkflowError(f"Invalid input: {InputErrors(_problems)}")
BENCH_ARMS = list(dict.fromkeys(a for c in BENCH_COMPARISONS for a in [c["reference"], *c["arms"]]))


def generator_jobs(generator, sample_set):
    """The jobs whose benchmark files give a generator's compute: what it trains (and what it
    draws from) and the job that samples the arm's set."""
    suffix = "" if sample_set is None else f"_{sample_set}"
    label = ["train_label_vae", "train_label_ldm"]
    return {
        "brainspade": {
            "training": [*label, "train_image_generator"],
            "sampling": f"sample_synthetic{suffix}",
        },
        "gmm": {"training": label, "sampling": f"synthesize_gmm{suffix}"},
        "lesion_insertion": {"training": [], "sampling": f"insert_lesions{suffix}"},
    }[generator]


def benchmark_generators():
    """generator -> its jobs and volume count, for the generators the compared arms draw from
    (the first arm's sample set where arms of one generator differ)."""
    found = {}
    for a in BENCH_ARMS:
        if SEG_DESIGN["cases"][a]["synthetic"]:
            gen, sample_set = SEG_DESIGN["generators"][a], SEG_DESIGN["sample_sets"][a]
            found.setdefault(gen, {**generator_jobs(gen, sample_set), "n": len(sample_set_ids(sample_set))})
    return found


def benchmark_targets():
    if not BENCH_COMPARISONS:
        return []
    return [f"{R}/benchmark/generators.{ext}" for ext in ("csv", "png")]


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
