# Inputs: the embedded demo cohort, the working-grid template, and ingest of
# BraTS / BIDS directory layouts into a sample sheet.


rule build_template:
    """Working-grid template (T1 head, brain mask, tissue labels and priors) from nilearn's
    MNI152 2009; a user T1 head template + brain mask (in MNI space) replace T1 and mask."""
    output:
        t1=template_file("t1"),
        brain_mask=template_file("brain_mask"),
        labels=template_file("labels"),
        priors=template_file("priors"),
    input:
        **{k: v for k, v in config["template"].items() if v},
    params:
        grid=config["grid"],
        labels=config["labels"],
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/cohort/build_template.log",
    resources:
        mem_mb=4000,
        runtime=10,
    script:
        "../scripts/build_template.py"


rule demo_atlas:
    """The 1 mm MNI152 atlas the demo subjects are warped from, built once (3 s) and read by every
    subject (0.1 s) instead of rebuilt per subject."""
    output:
        f"{R}/cohort/atlas.npz",
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/cohort/demo_atlas.log",
    resources:
        mem_mb=3000,
        runtime=5,
    script:
        "../scripts/demo_atlas.py"


# One rule per set of modalities the demo's sites deliver (config site_modalities): a T1-only
# site's subjects get no T2 or FLAIR file. The full set keeps the name synthesize_subject.
_DEMO_GROUPS = modality_groups(SUBJECT_MODALITIES) if DEMO else {tuple(MODALITIES): []}
for _mods, _subjects in _DEMO_GROUPS.items():

    rule:
        """One demo subject in its own native space: T1/T2/FLAIR with skull, bias, noise, lesions."""
        name:
            modality_rule_name("synthesize_subject", _mods)
        input:
            atlas=f"{R}/cohort/atlas.npz",
        output:
            **{m: f"{R}/cohort/{{subject}}/{m}.nii.gz" for m in _mods},
            label=f"{R}/cohort/{{subject}}/label.nii.gz",
            brain_mask=f"{R}/cohort/{{subject}}/brain_mask.nii.gz",
        params:
            row=lambda wc: SUBJECTS.loc[wc.subject].to_dict(),
            demo=config["demo"],
            labels=config["labels"],
            seed=config["seed"],
        wildcard_constraints:
            subject=one_of(_subjects) if len(_DEMO_GROUPS) > 1 else "[^/]+",
        conda:
            "../../envs/preprocessing.yaml"
        log:
            f"{LOGS}/cohort/synthesize_subject/{{subject}}.log",
        resources:
            mem_mb=3000,
            runtime=5,
        script:
            "../scripts/synthesize_subject.py"


rule cohort_sheet:
    """The demo cohort as a sample sheet (same format a user writes for real data)."""
    input:
        expand(f"{R}/cohort/{{subject}}/label.nii.gz", subject=SUBJECT_IDS),
    output:
        f"{R}/cohort/subjects.tsv",
    params:
        subjects=SUBJECTS,
        modalities=MODALITIES,
        site_modalities=SITE_MODALITIES,
    conda:
        "../../envs/preprocessing.yaml"
    log:
        f"{LOGS}/cohort/cohort_sheet.log",
    script:
        "../scripts/cohort_sheet.py"


rule ingest_dataset:
    """BraTS 2021 or BIDS directory -> sample sheet. Request it explicitly, e.g.
    snakemake results/ingest/brats_subjects.tsv --config ingest_root=/data/BraTS2021"""
    output:
        "results/ingest/{layout}_subjects.tsv",
    params:
        root=lambda wc: config.get("ingest_root") or "",
    wildcard_constraints:
        layout="brats|bids",
    conda:
        "../../envs/preprocessing.yaml"
    log:
        "logs/ingest/{layout}.log",
    script:
        "../scripts/ingest_dataset.py"
