# Generators: latent-diffusion label generator (VAE + LDM) and SPADE image generator,
# trained on the preprocessed training subjects; then synthetic sampling and quality.
# Training rules checkpoint under <out>/checkpoints and resume from there when rerun.
from brainsynth.generators.brainspade.settings import check_settings as check_label_generator_settings

GEN = f"{R}/generators"
LGCFG = config["label_generator"]
IGCFG = config["image_generator"]
# SYN, SYNCFG, STYLE_SET_SUBJECTS and the subject / sample helpers (generator_training_subjects,
# synthetic_ids, style_subjects, sample_set_files, tissue_maps, style_table, style_files) are
# in common.smk (generator stage helpers).

# The lesion types the label generator settings name: checked before any training.
try:
    check_label_generator_settings(LGCFG, list(SCHEMA.lesion_types))
except InputError as exc:
    raise WorkflowError(f"Invalid input: {exc}") from None


onstart:
    if synthesis_enabled():
        from brainsynth.generators.brainspade.label_generator import precision_notice

        notice = precision_notice(LGCFG)
        if notice:
            print(f"Note: {notice}", file=sys.stderr)


# Wall time and peak memory of each generator job (Snakemake benchmark files), for the
# generator benchmark's compute columns
BENCH = f"{R}/benchmarks/generators"
# Plain paths of the trained models and samples: consumers list them next to long file
# lists, and a `rules.<name>.output` reference there costs Snakemake a scan of those lists
# per file when the DAG is built (quadratic in the number of subjects).
LABEL_VAE = f"{GEN}/label_generator/label_vae.pt"
LABEL_VAE_CALIBRATION = f"{GEN}/label_generator/label_vae_calibration.json"
LABEL_LDM = f"{GEN}/label_generator/label_ldm.pt"
IMAGE_GENERATOR = f"{GEN}/image_generator/image_generator.pt"
# (LABEL_COMPOSE_WEIGHT, rule fit_compose_weight: in common.smk, beside fitted_compose_weight)

# torch CPU threads per generator job (num_threads in each section; a GPU run uses the GPU).
# The label networks are 3D convolutions that use a second core (label VAE 0.79 s/step on one
# thread, 0.43 on two; LDM 1.24 and 0.69, benchmarks/generators.py) and lie on the critical
# path of the run; the slice-wise image generator does not (0.112 and 0.103 s/step), so it
# runs on one core and leaves the other to another job.
LABEL_THREADS = LGCFG.get("num_threads") or 2
IMAGE_THREADS = IGCFG.get("num_threads") or 1
# The label generator chain (VAE -> LDM -> samples) is the critical path of the run: its jobs go
# first whenever they are ready.
GENERATOR_PRIORITY = 10


rule train_label_vae:
    """KL autoencoder over the probabilistic label maps (dice_ce or focal [+ LSGAN] + KL [+ perceptual])."""
    input:
        splits=split_tables(generator_training_subjects()),
    output:
        model=LABEL_VAE,
        config=f"{GEN}/label_generator/label_vae_config.json",
        losses=f"{GEN}/label_generator/label_vae_losses.tsv",
        curve=report(f"{GEN}/label_generator/label_vae_losses.png", category="Generators"),
    params:
        cfg=canonical({k: v for k, v in LGCFG.items() if k not in ("ldm", "sampling", "calibration")}),
        preprocessed=tissue_maps(generator_training_subjects()),
        labels=config["labels"],
        out=lambda wc, output: os.path.dirname(output.model),
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/train_label_vae.log",
    benchmark:
        f"{BENCH}/train_label_vae.tsv"
    threads: LABEL_THREADS
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=8000,
        runtime=240,
    script:
        "../scripts/train_label_vae.py"


rule calibrate_label_vae:
    """Per-class offsets of the VAE decoder's logits and one temperature, fitted on its training
    maps (label_generator.calibration); sampling and the audit decode with them, the LDM (encoder
    latents) does not."""
    input:
        splits=split_tables(generator_training_subjects()),
        vae=LABEL_VAE,
    output:
        calibration=LABEL_VAE_CALIBRATION,
    params:
        calibration=LGCFG.get("calibration"),
        preprocessed=tissue_maps(generator_training_subjects()),
        labels=config["labels"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/calibrate_label_vae.log",
    benchmark:
        f"{BENCH}/calibrate_label_vae.tsv"
    threads: LABEL_THREADS
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/calibrate_label_vae.py"


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
        cfg=canonical({k: v for k, v in LGCFG.items() if k not in ("sampling", "calibration")}),
        preprocessed=tissue_maps(generator_training_subjects()),
        subjects=generator_training_subjects(),
        labels=config["labels"],
        out=lambda wc, output: os.path.dirname(output.model),
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/train_label_ldm.log",
    benchmark:
        f"{BENCH}/train_label_ldm.tsv"
    threads: LABEL_THREADS
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=8000,
        runtime=480,
    script:
        "../scripts/train_label_ldm.py"


rule fit_label_sampling:
    """What the label decoder samples with, fitted on the trained label generator on maps drawn at
    the training maps' conditioning: the size of a random smooth deformation of each map, so they are
    as alike as the training maps of their phenotype (label_generator.sampling.deformation: fit), and
    one offset per tissue class on the decoder's logits, so they hold the training maps' mean tissue
    fractions (sampling.tissue_offsets: fit). Sampling, the compose-weight fit and the audit's
    samples decode with them; the audit's reconstructions with the VAE's offsets alone."""
    input:
        vae=LABEL_VAE,
        calibration=LABEL_VAE_CALIBRATION,
        ldm=LABEL_LDM,
        splits=split_tables(generator_training_subjects()),
    output:
        calibration=LABEL_SAMPLING_CALIBRATION,
    params:
        # its requests ask for one lesion type or none: composition and its weights play no part;
        # it judges the maps as the samples carry them (unrequested_lesions)
        sampling=canonical(
            {
                k: v
                for k, v in LGCFG.get("sampling", {}).items()
                if k
                not in (
                    "compose_lesion_types",
                    "compose_weight",
                    "tissue_offsets",
                    "deformation",
                )
            }
        ),
        fit={
            "tissue_offsets": fits_tissue_offsets(LGCFG),
            "deformation": fits_deformation(LGCFG),
        },
        preprocessed=tissue_maps(generator_training_subjects()),
        labels=config["labels"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/fit_label_sampling.log",
    benchmark:
        f"{BENCH}/fit_label_sampling.tsv"
    threads: LABEL_THREADS
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=8000,
        runtime=30,
    script:
        "../scripts/fit_label_sampling.py"


rule fit_compose_weight:
    """The weight of each lesion type in composed requests, fitted on the trained label generator
    (label_generator.sampling.compose_weight: fit): a WMH + tumour request then draws each type as
    large as a request for that type alone does; sampling and the audit read it."""
    input:
        vae=LABEL_VAE,
        calibration=sampling_calibration,
        ldm=LABEL_LDM,
    output:
        weights=LABEL_COMPOSE_WEIGHT,
    params:
        # the fit measures the requested types only: unrequested_lesions changes none of its volumes
        sampling=canonical(
            {
                k: v
                for k, v in LGCFG.get("sampling", {}).items()
                if k not in ("compose_weight", "unrequested_lesions")
            }
        ),
        labels=config["labels"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/fit_compose_weight.log",
    benchmark:
        f"{BENCH}/fit_compose_weight.tsv"
    threads: LABEL_THREADS
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/fit_compose_weight.py"


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
        out=lambda wc, output: os.path.dirname(output.model),
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/train_image_generator.log",
    benchmark:
        f"{BENCH}/train_image_generator.tsv"
    threads: IMAGE_THREADS
    resources:
        mem_mb=8000,
        runtime=720,
    script:
        "../scripts/train_image_generator.py"


# N synthetic (label, T1/T2/FLAIR) subjects on the working grid + manifest + montage, per sample
# set: the main one (synthesis: rule sample_synthetic -> synthesis/samples/) and each
# synthesis.sample_sets entry (rule sample_synthetic_<name> -> synthesis/sample_sets/<name>/),
# label maps drawn with other conditioning from the same trained generators for the arms that
# name them (E4: WMH + tumour together, unseen in training). One rule per set: its file list
# is its own.
for _set, _spec in [(None, SYNCFG), *(SYNCFG.get("sample_sets") or {}).items()]:
    _suffix = "" if _set is None else f"_{_set}"

    rule:
        name:
            f"sample_synthetic{_suffix}"
        input:
            vae=LABEL_VAE,
            calibration=sampling_calibration,
            ldm=LABEL_LDM,
            compose_weight=fitted_compose_weight,
            image_generator=IMAGE_GENERATOR,
            splits=split_tables(style_subjects()),
            reference=template_file("t1"),
        output:
            samples=sample_set_files(_set),
            manifest=f"{sample_set_root(_set)}/manifest.tsv",
            montage=report(
                f"{sample_set_root(_set)}/montage.png",
                category="Synthesis",
                caption="../report/synthetic_montage.rst",
            ),
        params:
            # what sampling uses (not style_roles, given through styles; not style_sets, whose
            # restyling is its own rule): adding a style set reruns no sampling
            synthesis={
                k: _spec.get(k, SYNCFG.get(k))
                for k in ("n_samples", "conditioning", "conditioning_values", "seed")
            },
            sampling=canonical(sampling_settings(LGCFG, SCHEMA.lesion_types)),
            labels=config["labels"],
            styles=style_table(style_subjects()),
            preprocessed=style_files(style_subjects()),
            out=lambda wc, output: os.path.dirname(output.manifest),
        conda:
            "../../envs/generators.yaml"
        log:
            f"{LOGS}/synthesis/sample_synthetic{_suffix}.log",
        benchmark:
            f"{BENCH}/sample_synthetic{_suffix}.tsv"
        threads: LABEL_THREADS
        priority: GENERATOR_PRIORITY
        resources:
            mem_mb=8000,
            runtime=240,
        script:
            "../scripts/sample_synthetic.py"


# One rule per set of modalities the style sets image (STYLE_SET_MODALITIES: a T1-only
# near-OOD set images T1 only); sets with every modality share the rule restyle_synthetic.
for _mods, _sets in modality_groups(STYLE_SET_MODALITIES).items():

    rule:
        """The synthetic label maps imaged again in the styles of other sites (domain-shift arms)."""
        name:
            modality_rule_name("restyle_synthetic", _mods)
        input:
            image_generator=IMAGE_GENERATOR,
            reference=template_file("t1"),
            labels=[f"{SYN}/samples/{sid}/labelprob.nii.gz" for sid in synthetic_ids()],
            splits=lambda wc: split_tables(STYLE_SET_SUBJECTS[wc.style_set]),
        output:
            samples=[
                f"{SYN}/style_sets/{{style_set}}/samples/{sid}/{m}.nii.gz"
                for sid in synthetic_ids()
                for m in _mods
            ],
            manifest=f"{SYN}/style_sets/{{style_set}}/manifest.tsv",
            montage=report(
                f"{SYN}/style_sets/{{style_set}}/montage.png",
                category="Generators",
                caption="../report/synthetic_montage.rst",
            ),
        params:
            # only a subset is named (a new key for every set would rerun them all)
            **({} if list(_mods) == MODALITIES else {"modalities": list(_mods)}),
            subjects=synthetic_ids(),
            styles=lambda wc: style_table(STYLE_SET_SUBJECTS[wc.style_set]),
            preprocessed=lambda wc: style_files(STYLE_SET_SUBJECTS[wc.style_set]),
            seed=SYNCFG["seed"],
            # the samples folder of the input label maps: <samples>/<id>/labelprob.nii.gz (n_samples >= 1)
            samples=lambda wc, input: os.path.dirname(os.path.dirname(input.labels[0])),
            out=lambda wc, output: os.path.dirname(output.manifest),
        wildcard_constraints:
            style_set=one_of(_sets),
        conda:
            "../../envs/generators.yaml"
        log:
            f"{LOGS}/synthesis/restyle_synthetic_{{style_set}}.log",
        threads: IMAGE_THREADS
        resources:
            mem_mb=8000,
            runtime=60,
        script:
            "../scripts/restyle_synthetic.py"


rule synthesis_quality:
    """MS-SSIM diversity, MMD, memorisation (nearest real subject), class volume fractions and
    per-class intensities with their contrast ordering, synthetic vs real."""
    input:
        splits=split_tables(generator_training_subjects()),
        samples=sample_set_files(),
    output:
        metrics=report(
            f"{SYN}/quality/quality_metrics.tsv",
            category="Synthesis",
            caption="../report/quality_metrics.rst",
        ),
        intensities=report(
            f"{SYN}/quality/class_intensities.tsv",
            category="Synthesis",
            caption="../report/class_intensities.rst",
        ),
        memorisation=f"{SYN}/quality/memorisation.tsv",
        fractions=f"{SYN}/quality/volume_fractions.tsv",
        summary=f"{SYN}/quality/volume_fractions_summary.tsv",
    params:
        synthetic=synthetic_ids(),
        real=[
            {**row, "labelprob": grid_file(row["subject"], "tissue_prob")}
            for row in style_table(generator_training_subjects())
        ],
        preprocessed=tissue_maps(generator_training_subjects()) + style_files(generator_training_subjects()),
        modalities=MODALITIES,
        labels=config["labels"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/synthesis/synthesis_quality.log",
    threads: 1
    resources:
        mem_mb=6000,
        runtime=60,
    script:
        "../scripts/synthesis_quality.py"


rule label_generator_fidelity:
    """The label generator judged alone: VAE reconstruction of training and held-out maps, then
    LDM samples per conditioning mode (adherence, tissue fractions, diversity, memorisation)."""
    input:
        vae=LABEL_VAE,
        calibration=LABEL_VAE_CALIBRATION,
        sampling_calibration=sampling_calibration,
        ldm=LABEL_LDM,
        compose_weight=fitted_compose_weight,
        splits=split_tables(generator_training_subjects() + held_out_label_subjects()),
    output:
        reconstruction=f"{SYN}/quality/label_reconstruction.tsv",
        gate=report(
            f"{SYN}/quality/label_reconstruction_gate.tsv",
            category="Synthesis",
            caption="../report/label_reconstruction_gate.rst",
        ),
        adherence=f"{SYN}/quality/label_adherence.tsv",
        samples=f"{SYN}/quality/label_adherence_samples.tsv",
        fidelity=report(
            f"{SYN}/quality/label_fidelity.tsv", category="Synthesis", caption="../report/label_fidelity.rst"
        ),
        figure=report(
            f"{SYN}/quality/label_adherence.png",
            category="Synthesis",
            caption="../report/label_adherence.rst",
        ),
    params:
        training=lambda wc: {s: grid_file(s, "tissue_prob") for s in generator_training_subjects()},
        held_out=lambda wc: {s: grid_file(s, "tissue_prob") for s in held_out_label_subjects()},
        preprocessed=tissue_maps(generator_training_subjects() + held_out_label_subjects()),
        # the segmenter's consistency target is not the label generator's business
        quality=canonical(
            {k: v for k, v in (SYNCFG.get("quality") or {}).items() if k != "consistency_max_gap"}
        ),
        sampling=canonical(sampling_settings(LGCFG, SCHEMA.lesion_types)),
        labels=config["labels"],
        voxel_mm=config["grid"]["voxel_mm"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/synthesis/label_generator_fidelity.log",
    threads: LABEL_THREADS
    # first in line too: the 2026-12-04 demo ran it last, alone on the machine for its 10 minutes
    priority: GENERATOR_PRIORITY
    resources:
        mem_mb=6000,
        runtime=60,
    script:
        "../scripts/label_generator_fidelity.py"


rule synthetic_sample_qc:
    """Flags synthetic samples that miss their conditioning, leave the training tissue ranges or
    sit closer to a training map than any held-out subject (synthesis.qc.drop_flagged)."""
    input:
        manifest=f"{SYN}/manifest.tsv",
        labels=[f"{SYN}/samples/{sid}/label.nii.gz" for sid in synthetic_ids()],
        splits=split_tables(generator_training_subjects() + held_out_label_subjects()),
    output:
        qc=report(f"{SYN}/quality/sample_qc.tsv", category="Synthesis", caption="../report/sample_qc.rst"),
    params:
        training=lambda wc: {s: grid_file(s, "tissue_prob") for s in generator_training_subjects()},
        held_out=lambda wc: {s: grid_file(s, "tissue_prob") for s in held_out_label_subjects()},
        preprocessed=tissue_maps(generator_training_subjects() + held_out_label_subjects()),
        labels=config["labels"],
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/synthesis/synthetic_sample_qc.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/synthetic_sample_qc.py"
