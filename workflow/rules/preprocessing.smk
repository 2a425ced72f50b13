# Preprocessing: input check of the whole cohort (and of the segmentation design against
# the label maps); then per subject, in one job, N4 -> rigid co-registration of each
# modality to the T1 (a subject without one: to its first modality) -> registration to the template -> skull stripping (template-mask
# propagation, or the non-zero support of pre-stripped data) -> working grid (normalised
# images, labels, probabilistic tissue maps) -> QC montage; then per-split tables of the
# preprocessed subjects and the cohort tables (QC, lesion proportions).

PP = f"{R}/preprocessing"
PPCFG = config["preprocessing"]
SKULL_STRIPPED_SITES = {str(s) for s in PPCFG.get("skull_stripped") or []}
# QC thresholds and exclusion only flag subjects: not part of what preprocess_subject computes
QC_ONLY = {"skull_strip": ("min_dice",), "coregistration": ("min_mask_dice",)}
PREPROCESS_SETTINGS = canonical(
    {
        k: ({kk: vv for kk, vv in v.items() if kk not in QC_ONLY.get(k, ())} if isinstance(v, dict) else v)
        for k, v in PPCFG.items()
        if k not in ("skull_stripped", "qc")
    }
)


rule validate_inputs:
    """Checks every subject's files (NIfTI, 3D, finite, label values, geometry) in one job,
    so a bad file stops the run before any subject is processed."""
    input:
        [f for s in SUBJECT_IDS for f in raw_inputs(s).values()],
    output:
        f"{PP}/validation/input_check.tsv",
    params:
        subjects=[
            {
                "subject": s,
                "site": str(SUBJECT_ROWS[s]["site"]),
                "split": SUBJECT_ROWS[s]["split"],
                **raw_inputs(s),
                **sheet_extras(s),
            }
            for s in SUBJECT_IDS
        ],
        modalities=MODALITIES,
        site_modalities=SITE_MODALITIES,
        labels=config["labels"],
        label_maps=config.get("label_maps"),
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/validate_inputs.log",
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/validate_inputs.py"


rule check_task_pools:
    """Stops a design whose arms cannot see any foreground of their task (no training subject
    with the task's classes), with the task and arm names, before any subject is processed."""
    input:
        rules.validate_inputs.output[0],
    output:
        f"{PP}/validation/task_pools.tsv",
    params:
        # a function of input: Snakemake's params trigger ignores it, so a design change does not
        # rerun this job, which would hide the params changes of every job downstream of it (they
        # are then left for the next run); design changes are checked at parse time instead
        # (check_task_pools_at_parse_time in common.smk), against this job's last input check
        pools=lambda wc, input: task_pools() if SEG_TASKS else {},
        tissues=config["labels"]["tissues"],
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/check_task_pools.log",
    localrule: True
    script:
        "../scripts/check_task_pools.py"


# The per-subject jobs wait for validate_inputs through this one-input relay instead of
# depending on its output directly: Snakemake scans the input list of a file's producer
# once per consumer (dag.update: `file in job.input`), so N subjects depending on a job
# with 4N inputs cost O(N^2) when the DAG is built (minutes at 10,000 subjects).
rule inputs_validated:
    """input_check.tsv: the cohort check passed (a copy of its table), and the segmentation
    design can see foreground in every arm (task_pools.tsv, when tasks run)."""
    input:
        rules.validate_inputs.output[0],
        [f"{PP}/validation/task_pools.tsv"] if SEG_TASKS else [],
    output:
        f"{PP}/input_check.tsv",
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/inputs_validated.log",
    localrule: True
    script:
        "../scripts/inputs_validated.py"


# Everything a subject's preprocessing makes lives in one folder, written by one job:
#   {PP}/subjects/<subject>/n4/, registration/, skull_strip/, grid/, qc.png
# (layout: brainsynth.preprocess.SUBJECT_LAYOUT). One job and one declared output per
# subject keep planning fast at cohort scale (benchmarks/dag_scale.py); any change of a
# preprocessing setting reruns the subject's whole chain.
SUBJECT_INPUTS = {
    s: {
        "images": [files[m] for m in SUBJECT_MODALITIES[s]],
        **{k: files[c] for k, c in (("label", "label"), ("truth", "brain_mask")) if c in files},
    }
    for s, files in RAW_INPUTS.items()
}
# what differs between subjects besides their files, in one dict per subject (one params
# function call per job: each costs Snakemake ~70 us, 10,000 jobs at cohort scale)
SUBJECT_SETTINGS = {
    s: {
        "label_map": label_map(s),
        "label_space": subject_value(s, "label_space") or anchor_modality(SUBJECT_MODALITIES[s]),
        "pre_stripped": str(SUBJECT_ROWS[s]["site"]) in SKULL_STRIPPED_SITES,
    }
    for s in SUBJECT_IDS
}


rule preprocess_subject:
    """N4 -> co-registration to the T1 -> registration to the template -> skull stripping ->
    working grid -> QC montage."""
    input:
        # images, and label / truth (brain mask) where the sheet has them: one input
        # function call per job (10,000 jobs at cohort scale)
        unpack(lambda wc: SUBJECT_INPUTS[wc.subject]),
        # ancient: validation orders the work but a re-check never forces a rerun
        checked=ancient(f"{PP}/input_check.tsv"),
        template=template_file("t1"),
        template_mask=template_file("brain_mask"),
        template_labels=template_file("labels"),
    output:
        report(
            directory(subject_folder("{subject}")),
            patterns=["{name}.png"],
            category="Preprocessing QC",
            subcategory="Subject montages",
            labels={"subject": "{subject}"},
            caption="../report/subject_montage.rst",
        ),
    params:
        # the section less the QC thresholds and exclusion, which only the QC table and the
        # later stages use; pre_stripped per subject, so listing a site reruns its subjects only
        preprocessing=PREPROCESS_SETTINGS,
        subject=lambda wc: SUBJECT_SETTINGS[wc.subject],
        # the subject's own (its site's): a T1-only or FLAIR-only dataset preprocesses what it has
        modalities=lambda wc: SUBJECT_MODALITIES[wc.subject],
        labels=config["labels"],
        seed=config["seed"],
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/preprocess_subject/{{subject}}.log",
    # one ITK thread: ANTs' multi-threaded metric sums differ from run to run (affine
    # parameters by up to ~0.03), single-threaded registration with a fixed seed is
    # bit-identical; subjects run in parallel instead
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/preprocess_subject.py"


rule preprocessed_subjects:
    """<split>.tsv: the split's preprocessed subjects and their working-grid files. Later
    stages depend on these tables, not on every subject's files (one input instead of
    thousands), and a split they do not use never reruns them."""
    input:
        lambda wc: [subject_folder(s) for s in subjects_with(wc.split)],
    output:
        f"{PP}/splits/{{split}}.tsv",
    params:
        rows=lambda wc: [
            {
                "subject": s,
                "folder": subject_folder(s),
                # only a subject short of the run's modalities says which it has (the rows are
                # params: a new key for every subject would rerun the table and what reads it)
                **({"modalities": SUBJECT_MODALITIES[s]} if SUBJECT_MODALITIES[s] != MODALITIES else {}),
                **{
                    c: str(SUBJECT_ROWS[s][c])
                    for c in ("site", "split", "role")
                    if SUBJECT_ROWS[s].get(c) is not None
                },
            }
            for s in subjects_with(wc.split)
        ],
        modalities=MODALITIES,
    wildcard_constraints:
        split="|".join(sorted(_BY_SPLIT)),
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/preprocessed_subjects/{{split}}.log",
    localrule: True
    script:
        "../scripts/preprocessed_subjects.py"


rule qc_table:
    """qc.tsv: skull-strip method, brain volume and Dice, co-registration head-mask Dice, a pass
    flag per check and overall; qc_failed.tsv lists the subjects failing a check."""
    input:
        splits=split_tables(SUBJECT_IDS),
    output:
        table=report(f"{PP}/qc.tsv", category="Preprocessing QC", caption="../report/qc_table.rst"),
        failed=report(f"{PP}/qc_failed.tsv", category="Preprocessing QC", caption="../report/qc_failed.rst"),
    params:
        # skull-strip records, then co-registration records, one per subject each
        preprocessed=[
            preprocessed(s, k) for k in ("skull_strip_qc", "coregistration_qc") for s in SUBJECT_IDS
        ],
        min_dice=PPCFG["skull_strip"]["min_dice"],
        min_coregistration_dice=(PPCFG.get("coregistration") or {}).get("min_mask_dice"),
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/qc_table.log",
    script:
        "../scripts/qc_table.py"


rule lesion_proportions:
    """dc_jl per subject: lesion voxel count over the cohort maximum, per lesion type."""
    input:
        splits=split_tables(SUBJECT_IDS),
    output:
        f"{PP}/lesion_proportions.tsv",
    params:
        preprocessed=[preprocessed(s, "lesions") for s in SUBJECT_IDS],
        labels=config["labels"],
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/preprocessing/lesion_proportions.log",
    script:
        "../scripts/lesion_proportions.py"
