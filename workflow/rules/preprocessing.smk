# Preprocessing per subject: input check -> N4 -> registration to the template ->
# skull stripping by template-mask propagation -> working grid (normalised images,
# labels, probabilistic tissue maps) -> QC; then cohort tables.

PP = f"{R}/preprocessing"
PPCFG = config["preprocessing"]


rule validate_inputs:
    """Checks every subject's files (NIfTI, 3D, finite, label values, geometry) in one job,
    so a bad file stops the run before any subject is processed."""
    input:
        [f for s in SUBJECT_IDS for f in raw_inputs(s).values()],
    output:
        f"{PP}/validation/input_check.tsv",
    params:
        subjects=[
            {"subject": s, "site": str(SUBJECT_ROWS[s]["site"]), "split": SUBJECT_ROWS[s]["split"],
             **raw_inputs(s)}
            for s in SUBJECT_IDS
        ],
        modalities=MODALITIES,
        labels=config["labels"],
        label_maps=config.get("label_maps"),
    log:
        f"{LOGS}/preprocessing/validate_inputs.log",
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/validate_inputs.py"


# The per-subject jobs wait for validate_inputs through this one-input relay instead of
# depending on its output directly: Snakemake scans the input list of a file's producer
# once per consumer (dag.update: `file in job.input`), so N subjects depending on a job
# with 4N inputs cost O(N^2) when the DAG is built (minutes at 10,000 subjects).
rule inputs_validated:
    """input_check.tsv: the cohort check passed (a copy of its table)."""
    input:
        rules.validate_inputs.output[0],
    output:
        f"{PP}/input_check.tsv",
    log:
        f"{LOGS}/preprocessing/inputs_validated.log",
    localrule: True
    run:
        import shutil

        from brainsynth.io import atomic_path

        with atomic_path(output[0]) as tmp:
            shutil.copyfile(input[0], tmp)
        with open(log[0], "w") as f:
            f.write(f"{input[0]} -> {output[0]}\n")


rule n4_bias_correct:
    input:
        # ancient: validation orders the work but a re-check never forces a rerun
        checked=ancient(f"{PP}/input_check.tsv"),
        images=lambda wc: [raw_path(wc.subject, m) for m in MODALITIES],
    output:
        [f"{PP}/n4/{{subject}}/{m}.nii.gz" for m in MODALITIES],
    params:
        n4=PPCFG["n4"],
    log:
        f"{LOGS}/preprocessing/n4_bias_correct/{{subject}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    script:
        "../scripts/n4_bias_correct.py"


rule register_to_template:
    input:
        t1=f"{PP}/n4/{{subject}}/t1.nii.gz",
        template=template_file("t1"),
    output:
        affine=f"{PP}/registration/{{subject}}/0GenericAffine.mat",
        warp=f"{PP}/registration/{{subject}}/1Warp.nii.gz",
        inverse_warp=f"{PP}/registration/{{subject}}/1InverseWarp.nii.gz",
        warped=f"{PP}/registration/{{subject}}/t1_in_template.nii.gz",
    params:
        registration=PPCFG["registration"],
        seed=config["seed"],
    log:
        f"{LOGS}/preprocessing/register_to_template/{{subject}}.log",
    # one ITK thread: ANTs' multi-threaded metric sums differ from run to run (affine
    # parameters by up to ~0.03), single-threaded registration with a fixed seed is
    # bit-identical; subjects run in parallel instead
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/register_to_template.py"


rule skull_strip:
    input:
        unpack(
            lambda wc: {"truth": raw_path(wc.subject, "brain_mask")}
            if has_column(wc.subject, "brain_mask")
            else {}
        ),
        t1=f"{PP}/n4/{{subject}}/t1.nii.gz",
        template_mask=template_file("brain_mask"),
        affine=rules.register_to_template.output.affine,
        inverse_warp=rules.register_to_template.output.inverse_warp,
    output:
        mask=f"{PP}/skull_strip/{{subject}}/brain_mask.nii.gz",
        qc=f"{PP}/skull_strip/{{subject}}/qc.json",
    params:
        skull_strip=PPCFG["skull_strip"],
    log:
        f"{LOGS}/preprocessing/skull_strip/{{subject}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/skull_strip.py"


rule resample_to_grid:
    input:
        unpack(
            lambda wc: {"label": raw_path(wc.subject, "label")}
            if has_column(wc.subject, "label")
            else {}
        ),
        images=lambda wc: [f"{PP}/n4/{wc.subject}/{m}.nii.gz" for m in MODALITIES],
        mask=rules.skull_strip.output.mask,
        affine=rules.register_to_template.output.affine,
        warp=rules.register_to_template.output.warp,
        template=template_file("t1"),
        template_labels=template_file("labels"),
    output:
        images=[f"{PP}/grid/{{subject}}/{m}.nii.gz" for m in MODALITIES],
        mask=f"{PP}/grid/{{subject}}/brain_mask.nii.gz",
        label=f"{PP}/grid/{{subject}}/label.nii.gz",
        tissue=f"{PP}/grid/{{subject}}/tissue_prob.nii.gz",
        lesions=f"{PP}/grid/{{subject}}/lesions.json",
    params:
        modalities=MODALITIES,
        labels=config["labels"],
        label_map=lambda wc: label_map(wc.subject),
        normalisation=PPCFG["normalisation"],
        tissue_maps=PPCFG["tissue_maps"],
    log:
        f"{LOGS}/preprocessing/resample_to_grid/{{subject}}.log",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    script:
        "../scripts/resample_to_grid.py"


rule qc_montage:
    input:
        t1=f"{PP}/n4/{{subject}}/t1.nii.gz",
        mask=rules.skull_strip.output.mask,
        qc=rules.skull_strip.output.qc,
        images=rules.resample_to_grid.output.images,
        label=rules.resample_to_grid.output.label,
    output:
        f"{PP}/qc/{{subject}}.png",
    params:
        modalities=MODALITIES,
        n_classes=len(config["labels"]["classes"]),
    log:
        f"{LOGS}/preprocessing/qc_montage/{{subject}}.log",
    script:
        "../scripts/qc_montage.py"


rule qc_table:
    input:
        expand(f"{PP}/skull_strip/{{subject}}/qc.json", subject=SUBJECT_IDS),
    output:
        f"{PP}/qc.tsv",
    params:
        min_dice=PPCFG["skull_strip"]["min_dice"],
    log:
        f"{LOGS}/preprocessing/qc_table.log",
    script:
        "../scripts/qc_table.py"


rule lesion_proportions:
    """dc_jl per subject: lesion voxel count over the cohort maximum, per lesion type."""
    input:
        expand(f"{PP}/grid/{{subject}}/lesions.json", subject=SUBJECT_IDS),
    output:
        f"{PP}/lesion_proportions.tsv",
    params:
        labels=config["labels"],
    log:
        f"{LOGS}/preprocessing/lesion_proportions.log",
    script:
        "../scripts/lesion_proportions.py"
