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
        fid=list(benchmark_fid_files().values()),
        quality=list(generator_quality_files().values()),
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
        fid=benchmark_fid_files(),
        quality=generator_quality_files(),
        task_modalities={t: list(SEG_DESIGN["task_inputs"][t][0]) for t in SEG_TASKS},
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


rule generator_image_fid:
    """FID and k-NN precision / recall of another generator's images on the features of the task's
    real-data nnU-Net encoder, beside the held-out real images' (as synthetic_image_fid)."""
    input:
        model=lambda wc: f"{SEG}/{wc.task}/{consistency_arm(wc.task)}/model.json",
        samples=lambda wc: [
            f
            for spec in image_audit_cases(wc.task, wc.generator)["synthetic"].values()
            for f in spec["images"].values()
        ],
        splits=lambda wc: image_audit_real_splits(wc.task),
    output:
        f"{R}/benchmark/quality/image_fid_{{task}}_{{generator}}.tsv",
    params:
        arm=lambda wc: consistency_arm(wc.task),
        real_test_set=lambda wc: consistency_test_set(wc.task),
        sets=lambda wc: image_audit_sets(wc.task, wc.generator),
        preprocessed=lambda wc: image_audit_real_files(wc.task),
        k=3,
        device=NNCFG.get("device", "auto"),
    wildcard_constraints:
        task=one_of(SEG_TASKS),
        generator=one_of([g for g in seg_design.GENERATORS if g != "brainspade"]),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/benchmark/image_fid_{{task}}_{{generator}}.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/synthetic_image_fid.py"


rule generator_quality:
    """One generator's main-set samples on the synthesis audit's measures: MS-SSIM diversity beside
    the real training images', Cohen's d of tissue volumes, conditioning adherence, tissue range,
    nearest-training Dice beside the held-out real subjects' (memorisation)."""
    input:
        samples=lambda wc: [f for spec in generator_samples(wc.generator).values() for f in spec.values()],
        manifest=lambda wc: label_manifest(wc.generator),
        splits=split_tables(generator_training_subjects() + held_out_label_subjects()),
    output:
        f"{R}/benchmark/quality/generator_quality_{{generator}}.tsv",
    params:
        samples=lambda wc: generator_samples(wc.generator),
        training=lambda wc: {
            s: {
                "labelprob": grid_file(s, "tissue_prob"),
                **{m: grid_file(s, m) for m in drawn_modalities(wc.generator)},
            }
            for s in generator_training_subjects()
        },
        held_out={s: grid_file(s, "tissue_prob") for s in held_out_label_subjects()},
        modalities=lambda wc: drawn_modalities(wc.generator),
        preprocessed=tissue_maps(generator_training_subjects() + held_out_label_subjects())
        + style_files(generator_training_subjects()),
        labels=config["labels"],
    wildcard_constraints:
        generator=one_of(seg_design.GENERATORS),
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/benchmark/generator_quality_{{generator}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/generator_quality.py"


rule value_curve:
    """Value of synthetic data: Dice of the VC_* arms against the synthetic:real ratio and the
    real fraction, per generator, with the spread over nnU-Net seeds."""
    input:
        scores=[f"{SEG}/{VALUE_CURVE['task']}/{a}/scores.tsv" for a in VALUE_CURVE_ARMS],
    output:
        csv=report(
            f"{R}/benchmark/value_curve.csv",
            caption="../report/value_curve.rst",
            category="Benchmark",
        ),
        md=f"{R}/benchmark/value_curve.md",
        tex=f"{R}/benchmark/value_curve.tex",
        figure=report(
            f"{R}/benchmark/value_curve.png",
            caption="../report/value_curve.rst",
            category="Benchmark",
        ),
    params:
        task=(VALUE_CURVE or {}).get("task"),
        test_set=(VALUE_CURVE or {}).get("test_set"),
        arms=VALUE_CURVE_ARMS,
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/benchmark/value_curve.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/value_curve.py"
