# Generator spade_diffusion: the maps of the label generator imaged by a SPADE-normalised
# diffusion model (MONAI SPADEDiffusionModelUNet, DDPM training, DDIM sampling, the modality as
# class embedding). An arm draws from it with segmentation.recipes.<arm>.generator:
# spade_diffusion; nothing here runs otherwise.
SDCFG = config.get("spade_diffusion") or {}
SPADE_DIFFUSION = f"{GEN}/spade_diffusion/spade_diffusion.pt"


rule train_spade_diffusion:
    """SPADE diffusion model over the axial brain slices of the generators' training subjects."""
    input:
        splits=split_tables(generator_training_subjects()),
    output:
        model=SPADE_DIFFUSION,
        config=f"{GEN}/spade_diffusion/spade_diffusion_config.json",
        losses=f"{GEN}/spade_diffusion/spade_diffusion_losses.tsv",
        curve=report(f"{GEN}/spade_diffusion/spade_diffusion_losses.png", category="Generators"),
    params:
        # inference_steps is the sampling rule's: changing it retrains nothing
        cfg=canonical({k: v for k, v in SDCFG.items() if k != "inference_steps"}),
        tissue=tissue_maps(generator_training_subjects()),
        images={m: [grid_file(s, m) for s in generator_training_subjects()] for m in MODALITIES},
        preprocessed=tissue_maps(generator_training_subjects()) + style_files(generator_training_subjects()),
        out=lambda wc, output: os.path.dirname(output.model),
    conda:
        "../../envs/generators.yaml"
    log:
        f"{LOGS}/generators/train_spade_diffusion.log",
    benchmark:
        f"{BENCH}/train_spade_diffusion.tsv"
    threads: SDCFG.get("num_threads") or 1
    resources:
        mem_mb=8000,
        runtime=720,
    script:
        "../scripts/train_spade_diffusion.py"


for _set, _spec in [(None, SYNCFG), *(SYNCFG.get("sample_sets") or {}).items()]:
    _suffix = "" if _set is None else f"_{_set}"

    rule:
        """Images of the label maps of one sample set, in the modalities its arms read (each image
        is a full DDIM chain: a modality no arm reads is not drawn)."""
        name:
            f"sample_spade_diffusion{_suffix}"
        input:
            model=SPADE_DIFFUSION,
            labels=[f"{sample_set_folder(_set)}/{sid}/labelprob.nii.gz" for sid in sample_set_ids(_set)],
        output:
            samples=[
                f"{generator_folder(_set, 'spade_diffusion')}/{sid}/{f}.nii.gz"
                for sid in sample_set_ids(_set)
                for f in ["label", *drawn_modalities("spade_diffusion", _set)]
            ],
            manifest=f"{os.path.dirname(generator_folder(_set, 'spade_diffusion'))}/manifest.tsv",
            montage=report(
                f"{os.path.dirname(generator_folder(_set, 'spade_diffusion'))}/montage.png",
                category="Synthesis",
                caption="../report/spade_diffusion_montage.rst",
            ),
        params:
            seed=_spec.get("seed", SYNCFG["seed"]),
            inference_steps=SDCFG.get("inference_steps"),
            device=SDCFG.get("device", "auto"),
            subjects=sample_set_ids(_set),
            modalities=drawn_modalities("spade_diffusion", _set),
            out=lambda wc, output: os.path.dirname(output.manifest),
        conda:
            "../../envs/generators.yaml"
        log:
            f"{LOGS}/synthesis/sample_spade_diffusion{_suffix}.log",
        benchmark:
            f"{BENCH}/sample_spade_diffusion{_suffix}.tsv"
        threads: SDCFG.get("num_threads") or 1
        resources:
            mem_mb=8000,
            runtime=240,
        script:
            "../scripts/sample_spade_diffusion.py"
