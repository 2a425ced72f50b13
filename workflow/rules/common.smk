# Shared helpers: subject table, paths, input functions. Parsed on every
# Snakemake start, so it only reads the sample sheet (never image data).

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from snakemake.exceptions import WorkflowError

from brainsynth.errors import InputError
from brainsynth.labels import LabelSchema, check_conditioning_mode
from brainsynth import demo as demo_cohort
from brainsynth import generator_benchmark as gen_bench
from brainsynth.generators.brainspade.settings import (
    fits_compose_weight,
    fits_deformation,
    fits_sampling_calibration,
    fits_tissue_offsets,
    sampling_settings,
)
from brainsynth.generators.common import paper_sections_from_run
from brainsynth.preprocess import SUBJECT_LAYOUT
from brainsynth.sheet import anchor_modality, check_site_modalities, load_sheet, site_modalities_of
from brainsynth.validate import check_files_exist

# a generator section that a run sets to preset paper comes from the config files of the run
# alone, without the demo budgets of config/config.yaml
_paper_sections = paper_sections_from_run(workflow.config_settings.overwrite_config)
config.update(_paper_sections)
if _paper_sections:
    print(
        f"Note: {', '.join(_paper_sections)}: preset paper, the settings of config/config.yaml left out",
        file=sys.stderr,
    )

EXP = config["experiment"]
R = f"results/{EXP}"
LOGS = f"logs/{EXP}"
MODALITIES = list(config["modalities"])
# sites delivering a subset of MODALITIES (a T1-only or FLAIR-only dataset); the rest deliver all
SITE_MODALITIES = dict(config.get("site_modalities") or {})
DEMO = config.get("samples") is None
USER_TEMPLATE = bool(config["template"].get("t1"))

try:
    SCHEMA = LabelSchema.from_config(config)
    if DEMO:
        SUBJECTS = demo_cohort.plan_cohort(config["demo"], config["seed"])
    else:
        SUBJECTS = load_sheet(config["samples"], MODALITIES, site_modalities=SITE_MODALITIES)
        check_files_exist(SUBJECTS, MODALITIES)
    check_site_modalities(SITE_MODALITIES, MODALITIES, SUBJECTS["site"].unique())
except InputError as exc:
    raise WorkflowError(f"Invalid input: {exc}") from None

SUBJECTS = SUBJECTS.set_index("subject", drop=False)
SUBJECT_IDS = list(SUBJECTS.index)
# The per-subject lookups below run for every job Snakemake builds (input functions,
# params): plain dicts, built once, instead of DataFrame.loc (about 50x slower per call).
SUBJECT_ROWS = SUBJECTS.astype(object).where(SUBJECTS.notna(), None).to_dict("index")
# the modalities each subject has (its site's, brainsynth.sheet.site_modalities_of), in run order
SUBJECT_MODALITIES = {
    s: site_modalities_of(row["site"], MODALITIES, SITE_MODALITIES) for s, row in SUBJECT_ROWS.items()
}


def _nonempty(value):
    return isinstance(value, str) and value != ""


def _raw_inputs(s):
    if DEMO:
        files = {m: f"{R}/cohort/{s}/{m}.nii.gz" for m in SUBJECT_MODALITIES[s]}
        files.update({k: f"{R}/cohort/{s}/{k}.nii.gz" for k in ("label", "brain_mask")})
        return files
    row = SUBJECT_ROWS[s]
    files = {m: row[m] for m in SUBJECT_MODALITIES[s]}
    files.update({k: row[k] for k in ("label", "brain_mask") if _nonempty(row.get(k))})
    return files


RAW_INPUTS = {s: _raw_inputs(s) for s in SUBJECT_IDS}


def modality_groups(modalities_by_key):
    """``{key: [modalities]}`` -> ``{tuple of modalities: [keys]}``: one rule per group where a
    rule's output files depend on the modalities (a T1-only site writes no FLAIR)."""
    groups = {}
    for key, mods in modalities_by_key.items():
        groups.setdefault(tuple(mods), []).append(key)
    return groups


def modality_rule_name(base, mods):
    """``base`` for the run's full set of modalities, ``base_<m1>_<m2>`` for a subset."""
    return base if list(mods) == MODALITIES else "_".join([base, *mods])


def one_of(names):
    """A wildcard constraint matching exactly ``names``."""
    import re

    return "|".join(re.escape(str(n)) for n in names) or "no-match"


wildcard_constraints:
    subject="[^/]+",
    modality="|".join(MODALITIES),


def has_column(subject, column):
    """True when the sheet gives this subject a non-empty ``column`` (label, brain_mask)."""
    if DEMO:
        return column in ("label", "brain_mask")
    return _nonempty(SUBJECT_ROWS[subject].get(column))


def subject_value(subject, column, default=None):
    """A sample-sheet cell (None when empty or when the sheet has no such column)."""
    value = SUBJECT_ROWS[subject].get(column)
    return default if value is None else value


def raw_inputs(s):
    """All input files of one subject: modalities, and label / brain_mask when given (do not modify)."""
    return RAW_INPUTS[s]


def template_file(name):
    return f"{R}/template/{name}.nii.gz"


_BY_SPLIT = {}
for _s in SUBJECT_IDS:
    _BY_SPLIT.setdefault(SUBJECT_ROWS[_s]["split"], []).append(_s)


def subjects_with(split=None):
    return list(SUBJECT_IDS if split is None else _BY_SPLIT.get(split, []))


def _qc_excluded():
    """Subjects failing preprocessing QC, when preprocessing.qc.exclude_failed is on: read from
    the QC table as it is when the workflow starts (brainsynth.qc.failed_subjects). The pools
    are fixed when Snakemake plans, so without a QC table yet the first run plans them whole
    and says so; the next run leaves the failed subjects out and reruns what they fed."""
    if not ((config["preprocessing"].get("qc") or {}).get("exclude_failed")):
        return set()
    table = Path(f"{R}/preprocessing/qc.tsv")
    if not table.exists():
        sys.stderr.write(
            f"preprocessing.qc.exclude_failed: {table} does not exist yet, so no subject is left out in "
            "this run; run snakemake again once it exists to leave out the subjects failing QC\n"
        )
        return set()
    from brainsynth.qc import failed_subjects

    failed = set(failed_subjects(table)) & set(SUBJECT_IDS)
    if failed:
        sys.stderr.write(
            f"preprocessing.qc.exclude_failed: {len(failed)} subject(s) failing QC left out of generator "
            f"training, styles, segmentation training and test sets: {', '.join(sorted(failed))}\n"
        )
    return failed


QC_EXCLUDED = _qc_excluded()


def passing_qc(subjects):
    """``subjects`` less those excluded for failing preprocessing QC (see _qc_excluded)."""
    return [s for s in subjects if s not in QC_EXCLUDED] if QC_EXCLUDED else list(subjects)


def canonical(section):
    """A config section with its keys sorted (recursively), for params.

    Snakemake compares params by their repr, so key order counts, and merging a partial
    --configfile puts the overridden keys first: the same values in another order would
    rerun the rule. Only for sections whose keys are names (not where order means
    something, like labels.lesion_types)."""
    if isinstance(section, dict):
        return {k: canonical(section[k]) for k in sorted(section)}
    if isinstance(section, list):
        return [canonical(v) for v in section]
    return section


def subject_folder(subject):
    """The folder of everything one subject's preprocessing makes (one job, one output)."""
    return f"{R}/preprocessing/subjects/{subject}"


def preprocessed(subject, kind, modality=None):
    """A file inside a preprocessed subject folder (kinds: brainsynth.preprocess.SUBJECT_LAYOUT).
    Plain string formatting: this runs hundreds of thousands of times at cohort scale."""
    return f"{subject_folder(subject)}/{SUBJECT_LAYOUT[kind].format(m=modality)}"


def grid_file(subject, name):
    """Working-grid file of a preprocessed subject: a modality, brain_mask, label or tissue_prob."""
    return preprocessed(subject, "image", name) if name in MODALITIES else preprocessed(subject, name)


def split_tables(subjects):
    """The per-split tables of preprocessed subjects covering ``subjects``: what a rule that reads
    preprocessed files of those subjects depends on (it lists the files in ``params.preprocessed``)."""
    splits = {SUBJECT_ROWS[s]["split"] for s in subjects}
    return [f"{R}/preprocessing/splits/{split}.tsv" for split in sorted(splits)]


def label_map(subject):
    """The label_maps entry for the subject's site (None: values are already schema values)."""
    return (config.get("label_maps") or {}).get(str(SUBJECT_ROWS[subject]["site"]))


def preprocessing_targets():
    # every subject folder too: Snakemake rebuilds a missing intermediate only for a job that
    # has to run, so a folder moved aside (brainsynth.integrity) is rebuilt because `all` asks for it
    return (
        [
            f"{R}/preprocessing/qc.tsv",
            f"{R}/preprocessing/lesion_proportions.tsv",
        ]
        + split_tables(SUBJECT_IDS)
        + [subject_folder(s) for s in SUBJECT_IDS]
    )


def synthesis_enabled():
    return bool((config.get("synthesis") or {}).get("enabled", True))


def generator_targets():
    if not synthesis_enabled():
        return []
    return [
        f"{R}/synthesis/manifest.tsv",
        f"{R}/synthesis/montage.png",
        f"{R}/synthesis/quality/quality_metrics.tsv",
        f"{R}/synthesis/quality/label_fidelity.tsv",
        f"{R}/synthesis/quality/sample_qc.tsv",
    ] + [
        f"{R}/synthesis/style_sets/{name}/{f}"
        for name in STYLE_SET_SUBJECTS
        for f in ("manifest.tsv", "montage.png")
    ]


def all_targets():
    targets = preprocessing_targets() + generator_targets()
    if DEMO:
        targets.append(f"{R}/cohort/subjects.tsv")
    return targets


# ============================================================ segmentation stage helpers
# (experiment design of workflow/rules/segmentation.smk: arms, tasks, test sets; the logic
# lives in brainsynth.experiment). Parse-time only: reads config and the subject table.
from brainsynth import experiment as seg_design

SEG = f"{R}/segmentation"
SEGCFG = config.get("segmentation") or {}
NNCFG = SEGCFG.get("nnunet") or {}
SYNTH_SAMPLES = f"{R}/synthesis/samples"
STYLE_SETS = f"{R}/synthesis/style_sets"


def sample_set_ids(name=None):
    """Synthetic case ids of the main sample set (None) or of a synthesis.sample_sets entry."""
    synth_cfg = config.get("synthesis") or {}
    spec = synth_cfg if name is None else (synth_cfg.get("sample_sets") or {})[name]
    return seg_design.synthetic_ids(spec.get("n_samples", synth_cfg.get("n_samples", 0)))


def _seg_design():
    """Active tasks/arms, training cases per arm, test sets, dataset ids (computed once)."""
    synth_cfg = config.get("synthesis") or {}
    synth_enabled = bool(synth_cfg.get("enabled", True))
    rows = {s: row for s, row in SUBJECT_ROWS.items() if s not in QC_EXCLUDED}
    default_pool = seg_design.select_subjects(
        rows, SEGCFG.get("real_pool"), "train", "segmentation.real_pool"
    )
    recipes = SEGCFG.get("recipes") or {}
    task_defs = SEGCFG.get("task_definitions") or {}
    for name in list(recipes) + list(task_defs):
        if not seg_design.NAME_RE.match(str(name)):
            raise InputError(
                f"name {name!r} is not letters, digits, '_' and '-'",
                field="segmentation",
                fix="rename it (names become nnU-Net dataset names and folders)",
            )
    unknown = [a for a in SEGCFG.get("arms", []) if a not in recipes]
    unknown += [t for t in SEGCFG.get("tasks", []) if t not in task_defs]
    if unknown:
        raise InputError(
            f"{unknown} not defined",
            field="segmentation.arms/tasks",
            fix="define arms under segmentation.recipes, tasks under segmentation.task_definitions",
        )
    arms = [a for a in SEGCFG.get("arms", []) if synth_enabled or not seg_design.uses_synthetic(recipes[a])]
    dropped = [a for a in SEGCFG.get("arms", []) if a not in arms]
    if dropped:
        sys.stderr.write(f"synthesis.enabled is false: arms {dropped} (synthetic data) are left out\n")
    sample_sets = synth_cfg.get("sample_sets") or {}
    check_conditioning_mode(
        synth_cfg.get("conditioning", "random"), SCHEMA.lesion_types, "synthesis.conditioning"
    )
    for name, spec in sample_sets.items():
        if spec.get("conditioning"):
            check_conditioning_mode(
                spec["conditioning"], SCHEMA.lesion_types, f"synthesis.sample_sets.{name}.conditioning"
            )
    for a in arms:
        name = recipes[a].get("sample_set")
        if name is not None and name not in sample_sets:
            raise InputError(
                f"sample_set {name!r} is not defined",
                field=f"segmentation.recipes.{a}.sample_set",
                fix=f"name one of synthesis.sample_sets ({sorted(sample_sets)}) or drop the key",
            )
    tasks = list(SEGCFG.get("tasks", []))
    if not tasks:
        test_sets = {}
    elif SEGCFG.get("test_sets"):
        test_sets = seg_design.defined_test_sets(rows, SEGCFG["test_sets"])
    else:
        test_sets = seg_design.test_sets(
            SUBJECTS[~SUBJECTS["subject"].isin(QC_EXCLUDED)], SEGCFG.get("test_sets_by", "role")
        )
    task_arms, task_inputs = {}, {}
    for t in tasks:
        excluded = task_defs[t].get("exclude_arms") or []
        listed = task_defs[t].get("arms")
        stray = [a for a in excluded + list(listed or []) if a not in recipes]
        if stray:
            raise InputError(
                f"task {t!r} names arms {stray} that are not defined",
                field=f"segmentation.task_definitions.{t}.arms / exclude_arms",
                fix="name arms defined under segmentation.recipes",
            )
        task_arms[t] = [a for a in arms if a not in excluded and (listed is None or a in listed)]
        task_inputs[t] = seg_design.task_inputs(task_defs[t], MODALITIES, list(test_sets), t)
    real_pools = {
        a: (
            seg_design.select_subjects(
                rows, recipes[a]["real_pool"], "train", f"segmentation.recipes.{a}.real_pool"
            )
            if "real_pool" in recipes[a]
            else default_pool
        )
        for a in arms
    }
    design = {
        "tasks": tasks,
        "arms": arms,
        "task_arms": task_arms,
        "task_inputs": task_inputs,
        "cases": {
            a: seg_design.arm_cases(
                recipes[a],
                real_pools[a],
                (sample_set_ids(recipes[a].get("sample_set")) if synth_enabled else []),
                config["seed"],
                a,
            )
            for a in arms
        },
        "style_sets": {a: seg_design.style_set(recipes[a], synth_cfg.get("style_sets"), a) for a in arms},
        "sample_sets": {a: recipes[a].get("sample_set") for a in arms},
        "generators": {a: seg_design.generator(recipes[a], a) for a in arms},
        "seeds": {a: seg_design.training_seed(recipes[a], config["seed"], a) for a in arms},
        # per (task, arm): the images of the training cases, one per input channel
        "modalities": {
            (t, a): seg_design.arm_modalities(recipes[a], task_inputs[t][0], MODALITIES, a)
            for t in tasks
            for a in task_arms[t]
        },
        "groups": {t: seg_design.task_classes(task_defs[t], SCHEMA, t) for t in tasks},
        "test_sets": test_sets,
        # from the names: adding or reordering arms moves no id
        "ids": {
            (t, a): seg_design.dataset_id(t, a, (SEGCFG.get("nnunet") or {}).get("dataset_id_base", 100))
            for t in tasks
            for a in task_arms[t]
        },
    }
    for t in tasks:
        for a in task_arms[t]:
            seg_design.check_modalities_available(
                f"arm {a} of task {t}",
                design["cases"][a]["real"],
                design["modalities"][(t, a)],
                SUBJECT_MODALITIES,
                f"segmentation.recipes.{a}",
                "draw the arm's real_pool from sites delivering those modalities (config site_modalities), "
                "or give the recipe the modalities its subjects have",
            )
        for ts, mods in task_inputs[t][1].items():
            seg_design.check_modalities_available(
                f"test set {ts} of task {t}",
                test_sets[ts],
                mods,
                SUBJECT_MODALITIES,
                f"segmentation.task_definitions.{t}.test_modalities.{ts}",
                "feed the test set the modalities its subjects have (test_modalities), or narrow "
                f"segmentation.test_sets.{ts} to sites delivering {mods}",
            )
    if tasks and arms and not design["test_sets"]:
        raise InputError(
            "no test subjects (split == test)",
            field="segmentation",
            fix="mark test subjects in the sample sheet or set segmentation.tasks: []",
        )
    ref = SEGCFG.get("reference_arm")
    design["reference_arm"] = {
        t: ref if ref in task_arms[t] else (task_arms[t][0] if task_arms[t] else None) for t in tasks
    }
    return design


def _add_value_curve_arms():
    """The value-of-synthetic-data curve (generator_benchmark.value_curve) as arms: its VC_* recipes
    join segmentation.recipes and arms, run by the curve's task only. Returns them."""
    curve = (config.get("generator_benchmark") or {}).get("value_curve")
    if not curve:
        return {}
    arms = gen_bench.value_curve_arms(curve)
    task_defs = SEGCFG.get("task_definitions") or {}
    if curve["task"] not in SEGCFG.get("tasks", []):
        raise InputError(
            f"task {curve['task']!r} does not run",
            field="generator_benchmark.value_curve.task",
            fix=f"use one of segmentation.tasks {SEGCFG.get('tasks', [])}",
        )
    SEGCFG["recipes"] = {**(SEGCFG.get("recipes") or {}), **{a: v["recipe"] for a, v in arms.items()}}
    SEGCFG["arms"] = list(dict.fromkeys([*SEGCFG.get("arms", []), *arms]))
    for t in SEGCFG["tasks"]:
        tdef = task_defs[t]
        if t == curve["task"]:
            if tdef.get("arms") is not None:
                tdef["arms"] = list(dict.fromkeys([*tdef["arms"], *arms]))
        elif tdef.get("arms") is None:
            tdef["exclude_arms"] = list(dict.fromkeys([*(tdef.get("exclude_arms") or []), *arms]))
    return arms


try:
    VALUE_CURVE_ARMS = _add_value_curve_arms()
    SEG_DESIGN = _seg_design()
except InputError as exc:
    raise WorkflowError(f"Invalid input: {exc}") from None
SEG_TASKS = SEG_DESIGN["tasks"]
SEG_ARMS = SEG_DESIGN["arms"]
SEG_TEST_SETS = SEG_DESIGN["test_sets"]


def seg_test_cases(task):
    """``[(test set, subject, [modalities fed to the channels])]`` the task's arms are scored on."""
    return [
        (ts, s, mods) for ts, mods in SEG_DESIGN["task_inputs"][task][1].items() for s in SEG_TEST_SETS[ts]
    ]


_SEG_CASE_FILES = {}


def seg_case_files(arm):
    """``{case_id: {"source", "images": {modality: path}, "label": path[, "style_set"]}}`` of an arm's
    training set; an arm with a style set takes its synthetic images from that set (built once
    per arm: input functions and params ask for it repeatedly; do not modify)."""
    if arm not in _SEG_CASE_FILES:
        _SEG_CASE_FILES[arm] = _seg_case_files(arm)
    return _SEG_CASE_FILES[arm]


def _seg_case_files(arm):
    cases = {}
    for s in SEG_DESIGN["cases"][arm]["real"]:
        cases[s] = {
            "source": "real",
            "label": grid_file(s, "label"),
            "images": {m: grid_file(s, m) for m in SUBJECT_MODALITIES[s]},
        }
    style_set, sample_set = SEG_DESIGN["style_sets"][arm], SEG_DESIGN["sample_sets"][arm]
    labels = generator_folder(sample_set, SEG_DESIGN["generators"][arm])
    images = f"{STYLE_SETS}/{style_set}/samples" if style_set else labels
    for s in SEG_DESIGN["cases"][arm]["synthetic"]:
        cases[s] = {
            "source": "synthetic",
            "label": f"{labels}/{s}/label.nii.gz",
            "images": {m: f"{images}/{s}/{m}.nii.gz" for m in style_set_modalities(style_set)},
            **({"style_set": style_set} if style_set else {}),
            **({"sample_set": sample_set} if sample_set else {}),
        }
    return cases


def seg_training_cases(task, arm):
    """The arm's training cases for ``task``: images narrowed to the modalities it feeds the
    task's channels (in channel order), keyed by channel ``0``, ``1``, ..."""
    mods = SEG_DESIGN["modalities"][(task, arm)]
    return {
        cid: {**spec, "images": {str(k): spec["images"][m] for k, m in enumerate(mods)}}
        for cid, spec in seg_case_files(arm).items()
    }


def style_set_modalities(name=None):
    """The modalities a style set images (None: the main set, every modality of the run)."""
    return MODALITIES if name is None else STYLE_SET_MODALITIES[name]


def sample_set_root(name=None):
    """Folder of the main synthetic set (None: samples, manifest, montage) or of a
    synthesis.sample_sets entry."""
    return f"{R}/synthesis" if name is None else f"{R}/synthesis/sample_sets/{name}"


def sample_set_folder(name=None):
    """Samples folder of the main synthetic set (None) or of a synthesis.sample_sets entry."""
    return f"{sample_set_root(name)}/samples"


def generator_folder(name=None, generator="brainspade"):
    """Samples folder of one generator for a sample set: brainSPADE's is the set's own; every
    other generator writes under <set root>/<generator>/."""
    return (
        sample_set_folder(name)
        if generator == "brainspade"
        else f"{sample_set_root(name)}/{generator}/samples"
    )


def sample_set_files(name=None):
    """Every file the sampling rule of one sample set writes into its samples folder."""
    return [
        f"{sample_set_folder(name)}/{sid}/{f}.nii.gz"
        for sid in sample_set_ids(name)
        for f in MODALITIES + ["label", "labelprob"]
    ]


def seg_task_arms(task):
    """The arms ``task`` runs: segmentation.arms less its task_definitions entry's exclude_arms."""
    return SEG_DESIGN["task_arms"][task]


def seg_metrics(task):
    """Metrics with a table and a figure for ``task`` (fp_tum for tasks that define it)."""
    metrics = list((SEGCFG.get("tables") or {}).get("metrics", ["dice"]))
    if not (SEGCFG.get("scoring") or {}).get("hd95", False):
        metrics = [m for m in metrics if m != "hd95"]
    if SEGCFG["task_definitions"][task].get("fp_tum"):
        metrics.append("fp_tum")
    return metrics


def _seg_experiments():
    """The study's experiments of this run (segmentation.experiments): name -> definition,
    checked against the design (brainsynth.study_tables.check_experiment)."""
    from brainsynth.metrics import OVERLAP_METRICS
    from brainsynth.study_tables import check_experiment

    defs = SEGCFG.get("experiment_definitions") or {}
    out = {}
    for name in SEGCFG.get("experiments") or []:
        if name not in defs:
            raise InputError(
                f"experiment {name!r} is not defined",
                field="segmentation.experiments",
                fix="define it under segmentation.experiment_definitions",
            )
        task = defs[name].get("task")
        available = set(OVERLAP_METRICS) | ({"hd95"} if (SEGCFG.get("scoring") or {}).get("hd95") else set())
        if task in SEG_TASKS and SEGCFG["task_definitions"][task].get("fp_tum"):
            available.add("fp_tum")
        check_experiment(
            name,
            defs[name],
            SEG_DESIGN["task_arms"],
            {t: SEG_DESIGN["task_inputs"][t][1] for t in SEG_TASKS},
            available,
        )
        out[name] = defs[name]
    return out


try:
    SEG_EXPERIMENTS = _seg_experiments()
except InputError as exc:
    raise WorkflowError(f"Invalid input: {exc}") from None


def experiment_outputs(name):
    """Table and figure files of one study experiment: results/<run>/tables/<experiment>/<paper name>.*"""
    stem = SEG_EXPERIMENTS[name].get("paper_name", name)
    return {
        **{ext: f"{R}/tables/{name}/{stem}.{ext}" for ext in ("csv", "md", "tex")},
        "pvalues": f"{R}/tables/{name}/{stem}_pvalues.csv",
        "figure": f"{R}/figures/{name}/{stem}.png",
    }


def segmentation_targets():
    if not SEG_TASKS or not SEG_ARMS:
        return []
    return (
        [
            f"{R}/{kind}/{t}_{m}.{ext}"
            for t in SEG_TASKS
            if seg_task_arms(t)
            for m in seg_metrics(t)
            for kind, ext in (("tables", "csv"), ("figures", "png"))
        ]
        + [experiment_outputs(name)[k] for name in SEG_EXPERIMENTS for k in ("csv", "figure")]
        + [f"{SEG}/design.tsv"]
        + image_audit_targets()
    )


def consistency_test_set(task):
    """The task's first test set fed its own modalities (far-OOD FLAIR asks another question)."""
    own, per_set = SEG_DESIGN["task_inputs"][task]
    return next((ts for ts, mods in per_set.items() if mods == own), None)


def consistency_arm(task):
    """The task's real-data model that scores synthetic images (synthetic_label_consistency):
    its first arm trained on real cases only and fed the task's own modalities; None without
    one, without a test set in those modalities, or when the run has no synthetic samples."""
    if not synthesis_enabled() or not sample_set_ids() or consistency_test_set(task) is None:
        return None
    own = SEG_DESIGN["task_inputs"][task][0]
    for a in seg_task_arms(task):
        cases = SEG_DESIGN["cases"][a]
        if cases["real"] and not cases["synthetic"] and SEG_DESIGN["modalities"][(task, a)] == own:
            return a
    return None


def image_audit_cases(task, generator="brainspade"):
    """What the image audit of ``task`` reads, per set: the consistency arm's real training
    subjects, its real test set (consistency_test_set) and the main sample set's synthetic
    subjects of ``generator``, each ``{case: {"label": path, "images": {channel: path}}}`` with
    the images the task feeds its channels."""
    channels = SEG_DESIGN["task_inputs"][task][0]
    synth = generator_folder(None, generator)

    def real(s):
        return {
            "label": grid_file(s, "label"),
            "images": {str(k): grid_file(s, m) for k, m in enumerate(channels)},
        }

    def synthetic(s):
        return {
            "label": f"{synth}/{s}/label.nii.gz",
            "images": {str(k): f"{synth}/{s}/{m}.nii.gz" for k, m in enumerate(channels)},
        }

    return {
        "training_real": {s: real(s) for s in SEG_DESIGN["cases"][consistency_arm(task)]["real"]},
        "held_out_real": {s: real(s) for s in SEG_TEST_SETS[consistency_test_set(task)]},
        "synthetic": {s: synthetic(s) for s in sample_set_ids()},
    }


def image_audit_real_splits(task):
    """The split tables of the real subjects an image audit of ``task`` reads."""
    cases = image_audit_cases(task)
    return split_tables([s for name in ("training_real", "held_out_real") for s in cases[name]])


def image_audit_real_files(task):
    """The real images an image audit of ``task`` reads (listed in params: preprocessed)."""
    cases = image_audit_cases(task)
    return [
        f
        for name in ("training_real", "held_out_real")
        for spec in cases[name].values()
        for f in spec["images"].values()
    ]


def image_audit_sets(task, generator="brainspade"):
    """Per set of the image audit: case id -> images keyed by input channel."""
    return {
        name: {case: spec["images"] for case, spec in cases.items()}
        for name, cases in image_audit_cases(task, generator).items()
    }


def image_audit_targets():
    """Label consistency and image FID of the synthetic images, per task with a real-data model."""
    return [
        f"{SYN}/quality/{kind}_{t}.tsv"
        for t in SEG_TASKS
        if consistency_arm(t)
        for kind in ("label_consistency", "image_fid")
    ]


def seg_train_setting(task, key, default=None):
    """Training length for ``task``: task_definitions.<task>.nnunet overrides segmentation.nnunet."""
    per_task = SEGCFG["task_definitions"][task].get("nnunet") or {}
    return per_task[key] if key in per_task else NNCFG.get(key, default)


def seg_plans_identifier():
    return NNCFG.get("plans_identifier") or (
        "nnUNetPlansDemo" if NNCFG.get("plans_overrides") else "nnUNetPlans"
    )


# ============================================================ end segmentation stage helpers


# ============================================================ generator stage helpers
# (training subjects, synthetic sample ids and style subjects of workflow/rules/generators.smk)
SYN = f"{R}/synthesis"
SYNCFG = config["synthesis"]


def _generator_training_subjects():
    """Training-split subjects with a label map (of synthesis.training_pool, when given: the
    study trains its generators on in-distribution data only): the generators learn from them."""
    pool = SYNCFG.get("training_pool")
    rows = {s: SUBJECT_ROWS[s] for s in passing_qc(subjects_with("train"))}
    try:
        chosen = set(seg_design.select_subjects(rows, pool, "train", "synthesis.training_pool"))
    except InputError as exc:
        raise WorkflowError(f"Invalid input: {exc}") from None
    found = [s for s in rows if s in chosen and has_column(s, "label")]
    if pool and not found and synthesis_enabled():
        raise WorkflowError(
            f"Invalid input: synthesis.training_pool {pool} selects no training subject with a label map "
            "(fix: name roles / sites / phenotypes of the subject table)"
        )
    if synthesis_enabled():
        _require_all_modalities(found, "synthesis.training_pool", "the generators learn from")
    return found


def _require_all_modalities(subjects, field, role):
    """The image generator learns and styles every modality of the run from these subjects."""
    try:
        seg_design.check_modalities_available(
            f"{field} ({role})",
            subjects,
            MODALITIES,
            SUBJECT_MODALITIES,
            field,
            "select sites that deliver every modality of the run (config site_modalities lists those that do not)",
        )
    except InputError as exc:
        raise WorkflowError(f"Invalid input: {exc}") from None


GENERATOR_TRAINING_SUBJECTS = _generator_training_subjects()


def generator_training_subjects():
    return list(GENERATOR_TRAINING_SUBJECTS)


def held_out_label_subjects():
    """Test-split subjects with a label map: the generators never see them, so they are the
    baseline of the fidelity audit (reconstruction, memorisation)."""
    return [s for s in passing_qc(subjects_with("test")) if has_column(s, "label")]


SAMPLE_QC = f"{SYN}/quality/sample_qc.tsv"


def drops_flagged_samples(arm):
    """synthesis.qc.drop_flagged and the arm trains on synthetic cases of the main set (the QC
    table flags those; a synthesis.sample_sets entry has its own ids and no QC table yet) with
    the label generator's maps (every generator but lesion insertion, which makes its own)."""
    qc = SYNCFG.get("qc") or {}
    return (
        bool(qc.get("drop_flagged"))
        and bool(SEG_DESIGN["cases"][arm]["synthetic"])
        and SEG_DESIGN["sample_sets"][arm] is None
        and SEG_DESIGN["generators"][arm] != "lesion_insertion"
    )


def synthetic_ids():
    """Ids of the main synthetic set (synth0001 ... synthNNNN)."""
    return sample_set_ids()


def style_subjects():
    """Real subjects whose images give the styles (by site role, or all training subjects)."""
    roles = SYNCFG.get("style_roles")
    if roles and "role" in SUBJECTS.columns:
        return [s for s in passing_qc(SUBJECT_IDS) if subject_value(s, "role") in roles]
    return generator_training_subjects()


if synthesis_enabled():
    _require_all_modalities(style_subjects(), "synthesis.style_roles", "the main set's styles")


def style_set_subjects():
    """brainsynth.experiment.style_set_subjects; a set no subject matches is left out, an
    error when arms use it."""
    style_sets = SYNCFG.get("style_sets") or {}
    rows = {s: row for s, row in SUBJECT_ROWS.items() if s not in QC_EXCLUDED}
    found = seg_design.style_set_subjects(rows, style_sets)
    for name in (n for n in style_sets if n not in found):
        keys = style_sets[name]
        users = [a for a in SEG_ARMS if SEG_DESIGN["style_sets"][a] == name]
        if users:
            raise WorkflowError(
                f"Invalid input: synthesis.style_sets.{name}: no subject has a site or site role "
                f"in {keys}, but arms {users} use it (fix: list sites or roles of the subject "
                "table, or drop the arms)"
            )
        sys.stderr.write(
            f"synthesis.style_sets.{name}: no subject has a site or site role in {keys}; "
            "the set is left out\n"
        )
    return found


STYLE_SET_SUBJECTS = style_set_subjects() if synthesis_enabled() else {}
# what a style set can image: the modalities any of its subjects has (a T1-only near-OOD
# dataset styles T1 only; each modality's styles come from the subjects that have it)
STYLE_SET_MODALITIES = {
    name: [m for m in MODALITIES if any(m in SUBJECT_MODALITIES[s] for s in subjects)]
    for name, subjects in STYLE_SET_SUBJECTS.items()
}


def _check_style_set_modalities():
    for t in SEG_TASKS:
        for a in seg_task_arms(t):
            name, mods = SEG_DESIGN["style_sets"][a], SEG_DESIGN["modalities"][(t, a)]
            lacking = [
                m for m in mods if name in STYLE_SET_MODALITIES and m not in STYLE_SET_MODALITIES[name]
            ]
            if lacking and SEG_DESIGN["cases"][a]["synthetic"]:
                raise WorkflowError(
                    f"Invalid input: arm {a} of task {t} feeds {mods}, but no subject of style set {name!r} "
                    f"has {lacking} (it images {STYLE_SET_MODALITIES[name]}) (field: segmentation.recipes.{a}; "
                    "fix: give the recipe modalities the style set has, or add sites with them to "
                    f"synthesis.style_sets.{name})"
                )


_check_style_set_modalities()


def tissue_maps(subjects):
    return [grid_file(s, "tissue_prob") for s in subjects]


def style_table(subjects):
    """Style subjects for the image generator: ``[{subject, <modality>: working-grid image}]``
    (the modalities each subject has)."""
    return [{"subject": s, **{m: grid_file(s, m) for m in SUBJECT_MODALITIES[s]}} for s in subjects]


def style_files(subjects):
    return [grid_file(s, m) for s in subjects for m in SUBJECT_MODALITIES[s]]


# rule fit_compose_weight writes it; sampling and the audit read it where the weights are fitted
LABEL_COMPOSE_WEIGHT = f"{R}/generators/label_generator/label_compose_weight.json"


def fitted_compose_weight(wildcards):
    """The fitted compose weights where label_generator.sampling.compose_weight is fit, else none."""
    return LABEL_COMPOSE_WEIGHT if fits_compose_weight(config["label_generator"], SCHEMA.lesion_types) else []


# the VAE's calibration plus the tissue offsets and the deformation fitted for sampling (written
# by the fit_label_sampling job)
LABEL_SAMPLING_CALIBRATION = f"{R}/generators/label_generator/label_sampling_calibration.json"


def sampling_calibration(wildcards):
    """The calibration sampling decodes with: the VAE's, plus the fitted tissue offsets and
    deformation where label_generator.sampling.tissue_offsets or deformation is fit."""
    return (
        LABEL_SAMPLING_CALIBRATION
        if fits_sampling_calibration(config["label_generator"])
        else LABEL_VAE_CALIBRATION
    )


# ============================================================ end generator stage helpers


# ============================================================ input-check helpers
def sheet_extras(s):
    """Sample-sheet cells the input check needs besides the files (label_space)."""
    space = subject_value(s, "label_space")
    return {"label_space": space} if space else {}


def task_pools():
    """Per task: its foreground classes, and per arm the real training subjects and (for arms
    with synthetic cases) the subjects the generators learn from."""
    gen = generator_training_subjects() if synthesis_enabled() else []
    class_name = dict(zip(SCHEMA.values, SCHEMA.names))
    recipes = SEGCFG.get("recipes") or {}
    return {
        t: {
            "classes": sorted({class_name[v] for vs in SEG_DESIGN["groups"][t].values() for v in vs}),
            "arms": {
                a: {
                    "real": list(SEG_DESIGN["cases"][a]["real"]),
                    "generator": gen if seg_design.uses_synthetic(recipes[a]) else [],
                }
                for a in seg_task_arms(t)
            },
        }
        for t in SEG_TASKS
    }


def check_task_pools_at_parse_time():
    """The design against the label maps as the last input check found them (rule
    check_task_pools checks the first run, this every later one, before anything is planned)."""
    checked = Path(f"{R}/preprocessing/validation/input_check.tsv")
    if not SEG_TASKS or not checked.exists():
        return
    when = checked.stat().st_mtime
    labels = [files["label"] for files in RAW_INPUTS.values() if "label" in files]
    if any(not os.path.exists(f) or os.path.getmtime(f) > when for f in labels):
        return  # label maps changed since: validate_inputs reruns and the rule checks them
    classes = seg_design.classes_from_input_check(checked, config["labels"]["tissues"])
    if classes is None:
        return  # written before label contents were recorded: the rule checks after revalidation
    try:
        seg_design.check_task_pools(task_pools(), classes)
    except InputError as exc:
        raise WorkflowError(f"Invalid input: {exc}") from None


check_task_pools_at_parse_time()


# ============================================================ generator benchmark helpers
# (workflow/rules/benchmark.smk: the comparisons, checked at parse time, and each generator's jobs)
from brainsynth.errors import InputErrors

BENCH_COMPARISONS = (config.get("generator_benchmark") or {}).get("comparisons") or []
_problems = gen_bench.check_comparisons(
    BENCH_COMPARISONS,
    {t: seg_task_arms(t) for t in SEG_TASKS},
    {t: list(SEG_DESIGN["task_inputs"][t][1]) for t in SEG_TASKS},
)
if _problems:
    raise WorkflowError(f"Invalid input: {InputErrors(_problems)}")
BENCH_ARMS = list(dict.fromkeys(a for c in BENCH_COMPARISONS for a in [c["reference"], *c["arms"]]))
VALUE_CURVE = (
    gen_bench.value_curve_config((config.get("generator_benchmark") or {}).get("value_curve"))
    if VALUE_CURVE_ARMS
    else None
)
if VALUE_CURVE and VALUE_CURVE["test_set"] not in SEG_DESIGN["task_inputs"][VALUE_CURVE["task"]][1]:
    raise WorkflowError(
        "Invalid input: "
        + str(
            InputError(
                f"test set {VALUE_CURVE['test_set']!r} is not one of task {VALUE_CURVE['task']!r}",
                field="generator_benchmark.value_curve.test_set",
                fix=f"use one of {list(SEG_DESIGN['task_inputs'][VALUE_CURVE['task']][1])}",
            )
        )
    )


def generator_jobs(generator, sample_set):
    """The jobs whose benchmark files give a generator's compute: what it trains (and what it
    draws from) and the job that samples the arm's set."""
    suffix = "" if sample_set is None else f"_{sample_set}"
    label = ["train_label_vae", "calibrate_label_vae", "train_label_ldm"]
    if fits_sampling_calibration(config["label_generator"]):
        label.append("fit_label_sampling")
    if fits_compose_weight(config["label_generator"], SCHEMA.lesion_types):
        label.append("fit_compose_weight")
    return {
        "brainspade": {
            "training": [*label, "train_image_generator"],
            "sampling": f"sample_synthetic{suffix}",
        },
        "gmm": {"training": label, "sampling": f"synthesize_gmm{suffix}"},
        "lesion_insertion": {"training": [], "sampling": f"insert_lesions{suffix}"},
        "spade_diffusion": {
            "training": [*label, "train_spade_diffusion"],
            "sampling": f"sample_spade_diffusion{suffix}",
        },
    }[generator]


def benchmark_generators():
    """generator -> its jobs and volume count, for the generators the compared arms draw from
    (the first arm's sample set where arms of one generator differ)."""
    found = {}
    for a in BENCH_ARMS:
        if SEG_DESIGN["cases"][a]["synthetic"]:
            gen, sample_set = SEG_DESIGN["generators"][a], SEG_DESIGN["sample_sets"][a]
            found.setdefault(gen, {**generator_jobs(gen, sample_set), "n": len(sample_set_ids(sample_set))})
    return found


def generator_image_fid(task, generator):
    """The image FID table of one generator's main-set samples on ``task``'s real-data encoder
    (brainSPADE's is the synthesis audit's own); None without a real-data model."""
    if not consistency_arm(task):
        return None
    if generator == "brainspade":
        return f"{SYN}/quality/image_fid_{task}.tsv"
    return f"{R}/benchmark/quality/image_fid_{task}_{generator}.tsv"


def benchmark_fid_pairs():
    """(task, generator) -> image FID table, for every generator a comparison's arms draw from."""
    pairs = {
        (c["task"], SEG_DESIGN["generators"][a])
        for c in BENCH_COMPARISONS
        for a in c["arms"]
        if SEG_DESIGN["cases"][a]["synthetic"]
    }
    found = {(t, g): generator_image_fid(t, g) for t, g in sorted(pairs)}
    return {k: v for k, v in found.items() if v}


def benchmark_fid_files():
    """The same tables keyed "task/generator" (the benchmark rules' named inputs)."""
    return {f"{t}/{g}": f for (t, g), f in benchmark_fid_pairs().items()}


def generator_modalities(generator, sample_set=None):
    """The modalities a generator images for a sample set, in run order: those its arms feed
    their tasks and, for the main set, those the benchmark image FID reads; every modality of
    the run when nothing names them (a generator run for its samples alone)."""
    needed = {
        m
        for (t, a), mods in SEG_DESIGN["modalities"].items()
        if SEG_DESIGN["cases"][a]["synthetic"]
        and SEG_DESIGN["generators"][a] == generator
        and SEG_DESIGN["sample_sets"][a] == sample_set
        for m in mods
    }
    if sample_set is None:
        needed |= {
            m for t, g in benchmark_fid_pairs() if g == generator for m in SEG_DESIGN["task_inputs"][t][0]
        }
    return [m for m in MODALITIES if m in needed] or MODALITIES


def drawn_modalities(generator, sample_set=None):
    """The modalities a generator's sample set holds images of: those read, for the generators
    that image only those; every modality of the run for the others."""
    if generator in seg_design.IMAGES_ONLY_READ_MODALITIES:
        return generator_modalities(generator, sample_set)
    return MODALITIES


def generator_samples(generator):
    """sample -> {"label" / modality: path} of a generator's main-set samples (what it wrote)."""
    folder = generator_folder(None, generator)
    return {
        sid: {f: f"{folder}/{sid}/{f}.nii.gz" for f in ["label", *drawn_modalities(generator)]}
        for sid in sample_set_ids()
    }


def label_manifest(generator, sample_set=None):
    """The manifest with the conditioning of a generator's label maps (brainSPADE's for the
    generators that image its maps)."""
    source = seg_design.LABEL_MAPS_FROM.get(generator, generator)
    return f"{os.path.dirname(generator_folder(sample_set, source))}/manifest.tsv"


def generator_quality_files():
    """generator -> its quality table, for the generators the compared arms draw from."""
    return {g: f"{R}/benchmark/quality/generator_quality_{g}.tsv" for g in benchmark_generators()}


def benchmark_targets():
    out = [f"{R}/benchmark/generators.{ext}" for ext in ("csv", "png")] if BENCH_COMPARISONS else []
    if VALUE_CURVE:
        out += [f"{R}/benchmark/value_curve.{ext}" for ext in ("csv", "png")]
    return out
