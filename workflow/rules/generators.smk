# Generators: latent-diffusion label generator (VAE + LDM) and SPADE image generator,
# trained on the preprocessed training subjects; then synthetic sampling and quality.
# Training rules checkpoint under <out>/checkpoints and resume from there when rerun.

GEN = f"{R}/generators"
SYN = f"{R}/synthesis"
LGCFG = config["label_generator"]
IGCFG = config["image_generator"]
SYNCFG = config["synthesis"]


def generator_training_subjects():
    """Training-split subjects with a label map: the generators learn from them."""
    return [s for s in subjects_with("train") if has_column(s, "label")]


def synthetic_ids():
    return [f"synth{i + 1:04d}" for i in range(int(SYNCFG["n_samples"]))]


def style_subjects():
    """Real subjects whose images give the styles (by site role, or all training subjects)."""
    roles = SYNCFG.get("style_roles")
    if roles and "role" in SUBJECTS.columns:
        return [s for s in SUBJECT_IDS if subject_value(s, "role") in roles]
    return generator_training_subjects()


def _style_set_subjects():
    """brainsynth.experiment.style_set_subjects; a set no subject matches is left out, an
    error when arms use it."""
    style_sets = SYNCFG.get("style_sets") or {}
    found = seg_design.style_set_subjects(SUBJECT_ROWS, style_sets)
    for name in (n for n in style_sets if n not in found):
        keys = style_sets[name]
        users = [a for a in SEG_ARMS if SEG_DESIGN["style_sets"][a] == name]
        if users:
            raise WorkflowError(f"Invalid input: synthesis.style_sets.{name}: no subject has a site or site role "
                                f"in {keys}, but arms {users} use it (fix: list sites or roles of the subject "
                                "table, or drop the arms)")
        sys.stderr.write(f"synthesis.style_sets.{name}: no subject has a site or site role in {keys}; "
                         "the set is left out\n")
    return found


STYLE_SET_SUBJECTS = _style_set_subjects() if synthesis_enabled() else {}


# Plain paths of the trained models and samples: consumers list them next to long file
# lists, and a `rules.<name>.output` reference there costs Snakemake a scan of those lists
# per file when the DAG is built (quadratic in the number of subjects).
LABEL_VAE = f"{GEN}/label_generator/label_vae.pt"
LABEL_LDM = f"{GEN}/label_generator/label_ldm.pt"
IMAGE_GENERATOR = f"{GEN}/image_generator/image_generator.pt"


def synthetic_files():
    return [f"{SYN}/samples/{sid}/{f}.nii.gz" for sid in synthetic_ids() for f in MODALITIES + ["label", "labelprob"]]


def tissue_maps(subjects):
    return [grid_file(s, "tissue_prob") for s in subjects]


def style_table(subjects):
    """Style subjects for the image generator: ``[{subject, <modality>: working-grid image}]``."""
    return [{"subject": s, **{m: grid_file(s, m) for m in MODALITIES}} for s in subjects]


def style_files(subjects):
    return [grid_file(s, m) for s in subjects for m in MODALITIES]


rule train_label_vae:
    """KL autoencoder over the probabilistic label maps (focal + LSGAN + KL [+ perceptual])."""
    input:
        splits=split_tables(generator_training_subjects()),
    output:
        model=LABEL_VAE,
        config=f"{GEN}/label_generator/label_vae_config.json",
        losses=f"{GEN}/label_generator/label_vae_losses.tsv",
        curve=report(f"{GEN}/label_generator/label_vae_losses.png", category="Generators"),
    params:
        cfg=canonical({k: v for k, v in LGCFG.items() if k not in ("ldm", "sampling")}),
        preprocessed=tissue_maps(generator_training_subjects()),
        out=f"{GEN}/label_generator",
    log:
        f"{LOGS}/generators/train_label_vae.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    script:
        "../scripts/train_label_vae.py"


rule train_label_ldm:
    """Latent diffusion on the VAE latents, cross-attention conditioned on dc_jl."""
    input:
        splits=split_tables(generator_training_subjects()),
        vae=LABEL_VAE,
        conditioning=f"{PP}/lesion_proportions.tsv",
    output:
        model=LABEL_LDM,
        config=f"{GEN}/label_generator/label_ldm_config.json",
        losses=f"{GEN}/label_generator/label_ldm_losses.tsv",
        curve=report(f"{GEN}/label_generator/label_ldm_losses.png", category="Generators"),
    params:
        cfg=canonical({k: v for k, v in LGCFG.items() if k != "sampling"}),
        preprocessed=tissue_maps(generator_training_subjects()),
        subjects=generator_training_subjects(),
        labels=config["labels"],
        out=f"{GEN}/label_generator",
    log:
        f"{LOGS}/generators/train_label_ldm.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=480,
    script:
        "../scripts/train_label_ldm.py"


rule train_image_generator:
    """SPADE VAE-GAN: style encoder + SPADE decoder, one model for all modalities."""
    input:
        splits=split_tables(generator_training_subjects()),
    output:
        model=IMAGE_GENERATOR,
        config=f"{GEN}/image_generator/image_generator_config.json",
        losses=f"{GEN}/image_generator/image_generator_losses.tsv",
        curve=report(f"{GEN}/image_generator/image_generator_losses.png", category="Generators"),
    params:
        cfg=canonical(IGCFG),
        tissue=tissue_maps(generator_training_subjects()),
        images={m: [grid_file(s, m) for s in generator_training_subjects()] for m in MODALITIES},
        preprocessed=tissue_maps(generator_training_subjects()) + style_files(generator_training_subjects()),
        out=f"{GEN}/image_generator",
    log:
        f"{LOGS}/generators/train_image_generator.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
    script:
        "../scripts/train_image_generator.py"


rule sample_synthetic:
    """N synthetic (label, T1/T2/FLAIR) subjects on the working grid + manifest + montage."""
    input:
        vae=LABEL_VAE,
        ldm=LABEL_LDM,
        image_generator=IMAGE_GENERATOR,
        splits=split_tables(style_subjects()),
        reference=template_file("t1"),
    output:
        samples=synthetic_files(),
        manifest=f"{SYN}/manifest.tsv",
        montage=report(f"{SYN}/montage.png", category="Generators",
                       caption="../report/synthetic_montage.rst"),
    params:
        # what sampling uses (not style_roles, given through styles; not style_sets, whose
        # restyling is its own rule): adding a style set reruns no sampling
        synthesis={k: SYNCFG.get(k) for k in ("n_samples", "conditioning", "conditioning_values", "seed")},
        sampling=canonical(LGCFG.get("sampling", {})),
        styles=style_table(style_subjects()),
        preprocessed=style_files(style_subjects()),
        out=SYN,
    log:
        f"{LOGS}/synthesis/sample_synthetic.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    script:
        "../scripts/sample_synthetic.py"


rule restyle_synthetic:
    """The synthetic label maps imaged again in the styles of other sites (domain-shift arms)."""
    input:
        image_generator=IMAGE_GENERATOR,
        reference=template_file("t1"),
        labels=[f"{SYN}/samples/{sid}/labelprob.nii.gz" for sid in synthetic_ids()],
        splits=lambda wc: split_tables(STYLE_SET_SUBJECTS[wc.style_set]),
    output:
        samples=[f"{SYN}/style_sets/{{style_set}}/samples/{sid}/{m}.nii.gz" for sid in synthetic_ids()
                 for m in MODALITIES],
        manifest=f"{SYN}/style_sets/{{style_set}}/manifest.tsv",
        montage=report(f"{SYN}/style_sets/{{style_set}}/montage.png", category="Generators",
                       caption="../report/synthetic_montage.rst"),
    params:
        subjects=synthetic_ids(),
        styles=lambda wc: style_table(STYLE_SET_SUBJECTS[wc.style_set]),
        preprocessed=lambda wc: style_files(STYLE_SET_SUBJECTS[wc.style_set]),
        seed=SYNCFG["seed"],
        samples=f"{SYN}/samples",
        out=lambda wc: f"{SYN}/style_sets/{wc.style_set}",
    wildcard_constraints:
        style_set="|".join(STYLE_SET_SUBJECTS) or "no-style-set",
    log:
        f"{LOGS}/synthesis/restyle_synthetic_{{style_set}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/restyle_synthetic.py"


rule synthesis_quality:
    """MS-SSIM diversity, MMD, memorisation (nearest real subject) and class volume fractions."""
    input:
        splits=split_tables(generator_training_subjects()),
        samples=synthetic_files(),
    output:
        metrics=report(f"{SYN}/quality/quality_metrics.tsv", category="Generators"),
        memorisation=f"{SYN}/quality/memorisation.tsv",
        fractions=f"{SYN}/quality/volume_fractions.tsv",
        summary=f"{SYN}/quality/volume_fractions_summary.tsv",
    params:
        synthetic=synthetic_ids(),
        real=[{**row, "labelprob": grid_file(row["subject"], "tissue_prob")}
              for row in style_table(generator_training_subjects())],
        preprocessed=tissue_maps(generator_training_subjects()) + style_files(generator_training_subjects()),
        modalities=MODALITIES,
        labels=config["labels"],
    log:
        f"{LOGS}/synthesis/synthesis_quality.log",
    threads: 1
    resources:
        mem_mb=6000,
        runtime=60,
    script:
        "../scripts/synthesis_quality.py"
