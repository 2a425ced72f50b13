# Generator lesion_insertion: tumours and WMH grown into the real healthy subjects of the
# generators' training pool, intensities from each subject's own tissue statistics (no
# training). An arm draws from it with segmentation.recipes.<arm>.generator: lesion_insertion;
# nothing here runs otherwise. Lesion volumes follow the training subjects, per
# the conditioning of the sample set (random, unseen, healthy or <lesion type>_only).
from brainsynth.generators.lesion_insertion import check_contrasts as lesion_insertion_check_contrasts
from brainsynth.generators.lesion_insertion import conditioning_modes as lesion_insertion_modes

LICFG = config.get("lesion_insertion") or {}

# Lesion volumes are drawn per conditioning mode; explicit dc values have no volume meaning here.
# The arms' sample sets are checked, and the main set when the benchmark audits its images.
_LESION_ARMS = [a for a in SEG_ARMS if SEG_DESIGN["generators"][a] == "lesion_insertion"]
_LESION_SETS = {SEG_DESIGN["sample_sets"][a]: a for a in _LESION_ARMS}
if any(a in BENCH_ARMS for a in _LESION_ARMS):
    _LESION_SETS.setdefault(None, next(a for a in _LESION_ARMS if a in BENCH_ARMS))
for _set, _arm in _LESION_SETS.items():
    _mode = ((SYNCFG.get("sample_sets") or {}).get(_set) or {}).get(
        "conditioning", SYNCFG.get("conditioning")
    )
    _modes = lesion_insertion_modes(SCHEMA.lesion_types)
    if _mode not in _modes:
        raise WorkflowError(
            f"Invalid input: field 'segmentation.recipes.{_arm}': generator lesion_insertion draws lesion "
            f"volumes for conditioning {', '.join(_modes)}, and its sample set has {_mode!r} "
            f"(fix: set the conditioning of {'synthesis' if _set is None else f'synthesis.sample_sets.{_set}'} "
            "to one of those, or use another generator)"
        )

if _LESION_ARMS:
    try:
        lesion_insertion_check_contrasts(
            LICFG.get("contrasts"),
            MODALITIES,
            [c for t in config["labels"]["lesion_types"].values() for c in t],
        )
    except InputError as exc:
        raise WorkflowError(f"Invalid input: {exc}") from None


for _set, _spec in [(None, SYNCFG), *(SYNCFG.get("sample_sets") or {}).items()]:
    _suffix = "" if _set is None else f"_{_set}"

    rule:
        """Samples of one sample set: real healthy subjects with lesions inserted."""
        name:
            f"insert_lesions{_suffix}"
        input:
            splits=split_tables(generator_training_subjects()),
        output:
            samples=[
                f"{generator_folder(_set, 'lesion_insertion')}/{sid}/{f}.nii.gz"
                for sid in sample_set_ids(_set)
                for f in ["label", *MODALITIES]
            ],
            manifest=f"{os.path.dirname(generator_folder(_set, 'lesion_insertion'))}/manifest.tsv",
            montage=report(
                f"{os.path.dirname(generator_folder(_set, 'lesion_insertion'))}/montage.png",
                category="Synthesis",
                caption="../report/lesion_insertion_montage.rst",
            ),
        params:
            contrasts=canonical(LICFG.get("contrasts") or {}),
            conditioning=_spec.get("conditioning", SYNCFG.get("conditioning")),
            seed=_spec.get("seed", SYNCFG["seed"]),
            subjects=sample_set_ids(_set),
            modalities=MODALITIES,
            hosts=[
                {"subject": s, "label": grid_file(s, "label"), **{m: grid_file(s, m) for m in MODALITIES}}
                for s in generator_training_subjects()
            ],
            preprocessed=[grid_file(s, "label") for s in generator_training_subjects()]
            + style_files(generator_training_subjects()),
            out=lambda wc, output: os.path.dirname(output.manifest),
        conda:
            "../../envs/generators.yaml"
        log:
            f"{LOGS}/synthesis/insert_lesions{_suffix}.log",
        benchmark:
            f"{BENCH}/insert_lesions{_suffix}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        script:
            "../scripts/insert_lesions.py"
