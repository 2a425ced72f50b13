# Segmentation experiment: for every (task, arm) an nnU-Net v2 dataset of real and/or
# synthetic cases -> plan + preprocess -> train -> predict every test set -> scores;
# then per task and metric a table and a figure across arms.
#
#   results/<exp>/segmentation/<task>/<arm>/
#       dataset.json          the assembled dataset: id, labels, cases and their sources
#       labels/<case>.nii.gz  training labels remapped to the task's nnU-Net labels
#       nnunet/{raw,preprocessed,results}   the arm's own nnU-Net roots
#       plans.json            the nnU-Net plans used (copy)
#       model.json            trained model: folder, checkpoint, training length, time
#       predictions/<test_set>/<subject>.nii.gz   task labels
#       predictions.tsv       subject, test set, prediction path (written after all of them)
#       scores.tsv            long score table (brainsynth.metrics)
#   results/<exp>/tables/<task>_<metric>.{csv,md,tex}, <task>_<metric>_pvalues.csv
#   results/<exp>/figures/<task>_<metric>.png
#
# Params hold only what each step depends on: the dataset step the arm's resolved case
# list and the task's class mapping, planning/training/prediction the nnU-Net settings.
# Changing one arm's recipe therefore reruns that arm and the task's tables only.

# NNCFG (segmentation.nnunet), seg_train_setting and seg_plans_identifier: common.smk.
SCORECFG = SEGCFG.get("scoring") or {}
TABCFG = SEGCFG.get("tables") or {}


wildcard_constraints:
    task="|".join(SEG_TASKS) or "no-task",
    arm="|".join(SEG_ARMS) or "no-arm",
    metric="|".join(sorted({m for t in SEG_TASKS for m in seg_metrics(t)})) or "no-metric",


# Plain paths of one (task, arm)'s files, not `rules.<name>.output` references: next to the
# long per-subject input lists those cost Snakemake a scan of the lists per file (quadratic
# in the number of subjects when the DAG is built).
ARM_DIR = f"{SEG}/{{task}}/{{arm}}"
ARM_DATASET = f"{ARM_DIR}/dataset.json"
ARM_PLANS = f"{ARM_DIR}/plans.json"
ARM_MODEL = f"{ARM_DIR}/model.json"
ARM_PREDICTIONS = f"{ARM_DIR}/predictions.tsv"


rule assemble_nnunet_dataset:
    """nnU-Net raw dataset of one (task, arm): labels remapped to the task, images linked."""
    input:
        splits=lambda wc: split_tables(SEG_DESIGN["cases"][wc.arm]["real"]),
        synthetic=lambda wc: [
            f
            for spec in seg_case_files(wc.arm).values()
            if spec["source"] == "synthetic"
            for f in [spec["label"], *spec["images"].values()]
        ],
        sample_qc=lambda wc: [SAMPLE_QC] if drops_flagged_samples(wc.arm) else [],
    output:
        dataset=ARM_DATASET,
        labels=directory(f"{SEG}/{{task}}/{{arm}}/labels"),
        raw=directory(f"{SEG}/{{task}}/{{arm}}/nnunet/raw"),
    params:
        dataset_id=lambda wc: SEG_DESIGN["ids"][(wc.task, wc.arm)],
        dataset_name=lambda wc: seg_design.dataset_name(wc.task, wc.arm),
        cases=lambda wc: seg_case_files(wc.arm),
        preprocessed=lambda wc: [
            f
            for spec in seg_case_files(wc.arm).values()
            if spec["source"] == "real"
            for f in [spec["label"], *spec["images"].values()]
        ],
        classes=lambda wc: SEG_DESIGN["groups"][wc.task],
        n_schema_classes=SCHEMA.n_classes,
        modalities=MODALITIES,
        # only arms with synthetic cases see the switch: turning it on reruns none of the R arms
        drop_flagged=lambda wc: drops_flagged_samples(wc.arm),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/assemble_nnunet_dataset.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/assemble_nnunet_dataset.py"


rule plan_nnunet:
    """nnU-Net fingerprint, integrity check, planning (small derived plans) and preprocessing."""
    input:
        dataset=ARM_DATASET,
    output:
        plans=ARM_PLANS,
    params:
        configuration=NNCFG.get("configuration", "3d_fullres"),
        plans_overrides=NNCFG.get("plans_overrides"),
        plans_identifier=seg_plans_identifier(),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/plan_nnunet.log",
        nnunet=f"{LOGS}/segmentation/{{task}}/{{arm}}/plan_nnunet.nnunet.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/plan_nnunet.py"


rule train_segmentation:
    """nnU-Net training of one (task, arm) (nnUNetTrainerBrainsynth: configurable length)."""
    input:
        dataset=ARM_DATASET,
        plans=ARM_PLANS,
    output:
        model=ARM_MODEL,
        results=directory(f"{SEG}/{{task}}/{{arm}}/nnunet/results"),
    params:
        configuration=NNCFG.get("configuration", "3d_fullres"),
        fold=NNCFG.get("fold", "all"),
        trainer=NNCFG.get("trainer", "nnUNetTrainerBrainsynth"),
        plans_identifier=seg_plans_identifier(),
        epochs=lambda wc: seg_train_setting(wc.task, "epochs"),
        iterations_per_epoch=lambda wc: seg_train_setting(wc.task, "iterations_per_epoch"),
        val_iterations_per_epoch=lambda wc: seg_train_setting(wc.task, "val_iterations_per_epoch"),
        final_validation=NNCFG.get("final_validation", False),
        device=NNCFG.get("device", "auto"),
        seed=config["seed"],
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/train_segmentation.log",
        nnunet=f"{LOGS}/segmentation/{{task}}/{{arm}}/train_segmentation.nnunet.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=8000,
        runtime=NNCFG.get("runtime", 120),
    script:
        "../scripts/train_segmentation.py"


rule predict_segmentation:
    """The arm's model on every test subject (all test sets, one model load)."""
    input:
        model=ARM_MODEL,
        splits=split_tables([s for _, s in SEG_TEST_CASES]),
    output:
        predictions=[f"{ARM_DIR}/predictions/{ts}/{s}.nii.gz" for ts, s in SEG_TEST_CASES],
        # written last: the scoring job depends on this one file, not on every prediction
        manifest=ARM_PREDICTIONS,
    params:
        cases=[
            {"case_id": s, "test_set": ts, "images": {m: grid_file(s, m) for m in MODALITIES}}
            for ts, s in SEG_TEST_CASES
        ],
        preprocessed=[grid_file(s, m) for _, s in SEG_TEST_CASES for m in MODALITIES],
        tile_step_size=NNCFG.get("tile_step_size", 0.5),
        use_mirroring=NNCFG.get("use_mirroring", False),
        device=NNCFG.get("device", "auto"),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/predict_segmentation.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/predict_segmentation.py"


rule score_segmentation:
    """Long score table of one (task, arm): per test subject, class and metric."""
    input:
        predictions=ARM_PREDICTIONS,
        splits=split_tables([s for _, s in SEG_TEST_CASES]),
    output:
        f"{SEG}/{{task}}/{{arm}}/scores.tsv",
    params:
        experiment=EXP,
        preprocessed=[grid_file(s, "label") for _, s in SEG_TEST_CASES],
        subjects=[
            {
                "subject": s,
                "test_set": ts,
                "site": str(SUBJECTS.loc[s, "site"]),
                **(
                    {"phenotype": str(SUBJECTS.loc[s, "phenotype"])}
                    if "phenotype" in SUBJECTS.columns
                    else {}
                ),
            }
            for ts, s in SEG_TEST_CASES
        ],
        classes=lambda wc: SEG_DESIGN["groups"][wc.task],
        fp_tum=lambda wc: seg_design.fp_tum_spec(
            SEGCFG["task_definitions"][wc.task], SEG_DESIGN["groups"][wc.task], SCHEMA
        ),
        hd95=SCORECFG.get("hd95", False),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/score_segmentation.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/score_segmentation.py"


rule segmentation_table:
    """One metric of one task across arms: mean (std) table vs the reference arm + box plots."""
    input:
        lambda wc: [f"{SEG}/{wc.task}/{a}/scores.tsv" for a in seg_task_arms(wc.task)],
    output:
        csv=report(
            f"{R}/tables/{{task}}_{{metric}}.csv",
            caption="../report/segmentation_table.rst",
            category="Segmentation",
            subcategory="{task}",
            labels={"task": "{task}", "metric": "{metric}", "kind": "table"},
        ),
        md=f"{R}/tables/{{task}}_{{metric}}.md",
        tex=f"{R}/tables/{{task}}_{{metric}}.tex",
        pvalues=f"{R}/tables/{{task}}_{{metric}}_pvalues.csv",
        figure=report(
            f"{R}/figures/{{task}}_{{metric}}.png",
            caption="../report/segmentation_figure.rst",
            category="Segmentation",
            subcategory="{task}",
            labels={"task": "{task}", "metric": "{metric}", "kind": "figure"},
        ),
    params:
        arms=lambda wc: seg_task_arms(wc.task),
        reference_arm=lambda wc: SEG_DESIGN["reference_arm"][wc.task],
        test_sets=list(SEG_TEST_SETS),
        test=TABCFG.get("test", "auto"),
        alpha=TABCFG.get("alpha", 0.05),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/tables/{{task}}_{{metric}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/segmentation_table.py"
