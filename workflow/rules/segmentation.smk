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
#       predictions/<test_set>/<subject>.nii.gz   task labels (the test sets of the task)
#       predictions/<test_set>.tsv   subject, test set, prediction path (written after them)
#       scores.tsv            long score table (brainsynth.metrics)
#   results/<exp>/tables/<task>_<metric>.{csv,md,tex}, <task>_<metric>_pvalues.csv
#   results/<exp>/figures/<task>_<metric>.png
#   results/<exp>/synthesis/quality/label_consistency_<task>.tsv, image_fid_<task>.tsv
#       the task's real-data model on the synthetic images (its Dice against their labels,
#       its encoder's features for FID): the image audit that needs a segmenter
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


rule segmentation_design:
    """The experiment design as planned: per (task, arm) its training cases, where they come from,
    the modalities fed to its channels and the test sets it is scored on (reviewers read the
    protocol from it; made from the config and the subject table alone)."""
    output:
        f"{SEG}/design.tsv",
    params:
        rows=[
            {
                "task": t,
                "arm": a,
                "real_cases": " ".join(SEG_DESIGN["cases"][a]["real"]),
                "synthetic_cases": " ".join(SEG_DESIGN["cases"][a]["synthetic"]),
                "sample_set": SEG_DESIGN["sample_sets"][a] or "",
                "style_set": SEG_DESIGN["style_sets"][a] or "",
                "generator": SEG_DESIGN["generators"][a] if SEG_DESIGN["cases"][a]["synthetic"] else "",
                "nnunet_seed": SEG_DESIGN["seeds"][a],
                "modalities": " ".join(SEG_DESIGN["modalities"][(t, a)]),
                "test_sets": " ".join(
                    f"{ts}:{'+'.join(mods)}" for ts, mods in SEG_DESIGN["task_inputs"][t][1].items()
                ),
                "n_test": sum(len(SEG_TEST_SETS[ts]) for ts in SEG_DESIGN["task_inputs"][t][1]),
            }
            for t in SEG_TASKS
            for a in seg_task_arms(t)
        ],
    localrule: True
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/segmentation_design.log",
    script:
        "../scripts/segmentation_design.py"


rule assemble_nnunet_dataset:
    """nnU-Net raw dataset of one (task, arm): labels remapped to the task, images linked."""
    input:
        splits=lambda wc: split_tables(SEG_DESIGN["cases"][wc.arm]["real"]),
        synthetic=lambda wc: [
            f
            for spec in seg_training_cases(wc.task, wc.arm).values()
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
        cases=lambda wc: seg_training_cases(wc.task, wc.arm),
        preprocessed=lambda wc: [
            f
            for spec in seg_training_cases(wc.task, wc.arm).values()
            if spec["source"] == "real"
            for f in [spec["label"], *spec["images"].values()]
        ],
        classes=lambda wc: SEG_DESIGN["groups"][wc.task],
        n_schema_classes=SCHEMA.n_classes,
        # input channel -> the modality the arm feeds it (R_fOD learns the tissue task from FLAIR)
        modalities=lambda wc: SEG_DESIGN["modalities"][(wc.task, wc.arm)],
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
    # nnU-Net's worker processes: the demo's R_id plans in 20 s with one, 18 s with two
    threads: NNCFG.get("threads", 2)
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
        seed=lambda wc: SEG_DESIGN["seeds"][wc.arm],
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
    """The arm's model on one test set of its task (each test set feeds its own modalities)."""
    input:
        model=ARM_MODEL,
        splits=lambda wc: split_tables(SEG_TEST_SETS[wc.test_set]),
    output:
        predictions=directory(f"{ARM_DIR}/predictions/{{test_set}}"),
        # written last: the scoring job depends on this one file, not on the folder's contents
        manifest=f"{ARM_DIR}/predictions/{{test_set}}.tsv",
    params:
        # test images keyed by input channel
        cases=lambda wc: [
            {"case_id": s, "test_set": ts, "images": {str(k): grid_file(s, m) for k, m in enumerate(mods)}}
            for ts, s, mods in seg_test_cases(wc.task)
            if ts == wc.test_set
        ],
        preprocessed=lambda wc: [
            grid_file(s, m) for ts, s, mods in seg_test_cases(wc.task) if ts == wc.test_set for m in mods
        ],
        tile_step_size=NNCFG.get("tile_step_size", 0.5),
        use_mirroring=NNCFG.get("use_mirroring", False),
        device=NNCFG.get("device", "auto"),
    wildcard_constraints:
        test_set="|".join(SEG_TEST_SETS) or "no-test-set",
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/{{task}}/{{arm}}/predict_segmentation_{{test_set}}.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/predict_segmentation.py"


rule score_segmentation:
    """Long score table of one (task, arm): per test subject, class and metric."""
    input:
        predictions=lambda wc: [
            f"{SEG}/{wc.task}/{wc.arm}/predictions/{ts}.tsv" for ts in SEG_DESIGN["task_inputs"][wc.task][1]
        ],
        splits=lambda wc: split_tables([s for _, s, _ in seg_test_cases(wc.task)]),
    output:
        f"{SEG}/{{task}}/{{arm}}/scores.tsv",
    params:
        experiment=EXP,
        preprocessed=lambda wc: [grid_file(s, "label") for _, s, _ in seg_test_cases(wc.task)],
        subjects=lambda wc: [
            {
                "subject": s,
                "test_set": ts,
                "site": str(SUBJECT_ROWS[s]["site"]),
                **(
                    {"phenotype": str(SUBJECT_ROWS[s]["phenotype"])}
                    if "phenotype" in SUBJECTS.columns
                    else {}
                ),
            }
            for ts, s, _ in seg_test_cases(wc.task)
        ],
        classes=lambda wc: SEG_DESIGN["groups"][wc.task],
        fp_tum=lambda wc: seg_design.fp_tum_spec(
            SEGCFG["task_definitions"][wc.task], SEG_DESIGN["groups"][wc.task], SCHEMA
        ),
        hd95=SCORECFG.get("hd95", False),
        hd95_definition=SCORECFG.get("hd95_definition", "monai"),
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
        test_sets=lambda wc: list(SEG_DESIGN["task_inputs"][wc.task][1]),
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


rule experiment_table:
    """One experiment of the study in its layout: its arms on its test sets, each pair tested."""
    input:
        lambda wc: [
            f"{SEG}/{SEG_EXPERIMENTS[wc.experiment]['task']}/{a}/scores.tsv"
            for a in SEG_EXPERIMENTS[wc.experiment]["arms"]
        ],
    output:
        csv=report(
            f"{R}/tables/{{experiment}}/{{paper_name}}.csv",
            caption="../report/experiment_table.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "kind": "table"},
        ),
        md=f"{R}/tables/{{experiment}}/{{paper_name}}.md",
        tex=f"{R}/tables/{{experiment}}/{{paper_name}}.tex",
        pvalues=f"{R}/tables/{{experiment}}/{{paper_name}}_pvalues.csv",
        figure=report(
            f"{R}/figures/{{experiment}}/{{paper_name}}.png",
            caption="../report/experiment_figure.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "kind": "figure"},
        ),
    params:
        definition=lambda wc: canonical(SEG_EXPERIMENTS[wc.experiment]),
        test=TABCFG.get("test", "auto"),
        alpha=TABCFG.get("alpha", 0.05),
        hd95_definition=SCORECFG.get("hd95_definition", "monai"),
    wildcard_constraints:
        experiment="|".join(SEG_EXPERIMENTS) or "no-experiment",
        paper_name="|".join({d.get("paper_name", n) for n, d in SEG_EXPERIMENTS.items()}) or "no-paper-name",
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/segmentation/tables/{{experiment}}_{{paper_name}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/experiment_table.py"


rule synthetic_label_consistency:
    """The task's real-data model on the synthetic images of the main sample set, scored against
    the label maps they were generated from, beside its Dice on real test images."""
    input:
        model=lambda wc: f"{SEG}/{wc.task}/{consistency_arm(wc.task)}/model.json",
        scores=lambda wc: f"{SEG}/{wc.task}/{consistency_arm(wc.task)}/scores.tsv",
        samples=sample_set_files(),
        # what each sample asked for: lesion classes are scored apart on requested and unrequested lesions
        manifest=f"{SYN}/manifest.tsv",
    output:
        predictions=directory(f"{SYN}/quality/label_consistency/{{task}}"),
        table=report(
            f"{SYN}/quality/label_consistency_{{task}}.tsv",
            caption="../report/label_consistency.rst",
            category="Synthesis",
            labels={"table": "label consistency", "task": "{task}"},
        ),
    params:
        arm=lambda wc: consistency_arm(wc.task),
        cases=lambda wc: [
            {"case_id": sid, **spec} for sid, spec in image_audit_cases(wc.task)["synthetic"].items()
        ],
        classes=lambda wc: SEG_DESIGN["groups"][wc.task],
        labels=config["labels"],
        real_test_set=lambda wc: consistency_test_set(wc.task),
        max_gap=(SYNCFG.get("quality") or {}).get("consistency_max_gap", 0.10),
        tile_step_size=NNCFG.get("tile_step_size", 0.5),
        use_mirroring=NNCFG.get("use_mirroring", False),
        device=NNCFG.get("device", "auto"),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/synthesis/label_consistency_{{task}}.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/synthetic_label_consistency.py"


rule synthetic_image_fid:
    """FID and k-NN precision / recall of the synthetic images on features of the task's real-data
    nnU-Net encoder (in-domain, offline), beside the held-out real images' figures."""
    input:
        model=lambda wc: f"{SEG}/{wc.task}/{consistency_arm(wc.task)}/model.json",
        samples=sample_set_files(),
        splits=lambda wc: image_audit_real_splits(wc.task),
    output:
        report(
            f"{SYN}/quality/image_fid_{{task}}.tsv",
            caption="../report/image_fid.rst",
            category="Synthesis",
            labels={"table": "image FID", "task": "{task}"},
        ),
    params:
        arm=lambda wc: consistency_arm(wc.task),
        real_test_set=lambda wc: consistency_test_set(wc.task),
        sets=lambda wc: image_audit_sets(wc.task),
        preprocessed=lambda wc: image_audit_real_files(wc.task),
        k=3,
        device=NNCFG.get("device", "auto"),
    conda:
        "../../envs/segmentation.yaml"
    log:
        f"{LOGS}/synthesis/image_fid_{{task}}.log",
    threads: NNCFG.get("threads", 2)
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/synthetic_image_fid.py"
