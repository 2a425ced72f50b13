# Generator gmm: the maps of the label generator imaged with domain-randomised Gaussian intensities
# per class, bias field, blur and noise (the SynthSeg generative model; no training). An arm
# draws from it with segmentation.recipes.<arm>.generator: gmm; nothing here runs otherwise.
GMMCFG = config.get("gmm_generator") or {}


# One rule per label set (the main samples, each synthesis.sample_sets entry), as in sampling.
for _set, _spec in [(None, SYNCFG), *(SYNCFG.get("sample_sets") or {}).items()]:
    _suffix = "" if _set is None else f"_{_set}"

    rule:
        """Domain-randomised images of the label maps of one sample set, every modality of the run."""
        name:
            f"synthesize_gmm{_suffix}"
        input:
            labels=[f"{sample_set_folder(_set)}/{sid}/label.nii.gz" for sid in sample_set_ids(_set)],
        output:
            samples=[
                f"{generator_folder(_set, 'gmm')}/{sid}/{f}.nii.gz"
                for sid in sample_set_ids(_set)
                for f in ["label", *MODALITIES]
            ],
            manifest=f"{os.path.dirname(generator_folder(_set, 'gmm'))}/manifest.tsv",
            montage=report(
                f"{os.path.dirname(generator_folder(_set, 'gmm'))}/montage.png",
                category="Synthesis",
                caption="../report/gmm_montage.rst",
            ),
        params:
            gmm=canonical(GMMCFG),
            seed=_spec.get("seed", SYNCFG["seed"]),
            subjects=sample_set_ids(_set),
            modalities=MODALITIES,
            out=lambda wc, output: os.path.dirname(output.manifest),
        conda:
            "../../envs/generators.yaml"
        log:
            f"{LOGS}/synthesis/synthesize_gmm{_suffix}.log",
        benchmark:
            f"{BENCH}/synthesize_gmm{_suffix}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        script:
            "../scripts/synthesize_gmm.py"
