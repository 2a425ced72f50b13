"""Design of the segmentation experiment: arms, tasks, test sets (parse-time safe).

Arms
----
An arm is a recipe for the nnU-Net training set, drawn from two pools: the
real training subjects (``split == train``) and the synthetic samples
(``synth0001``...). A recipe gives one fraction per pool::

    R:      {real: 1.0, synthetic: 0.0}                    # real only
    S:      {real: 0.0, synthetic: 1.0}                    # synthetic only
    H:      {real: 1.0, synthetic: 1.0}                    # real + synthetic
    R50S50: {real: 0.5, synthetic: 0.5, relative_to: real} # N_real cases, half of each
    Hfar:   {real: 1.0, synthetic: 1.0, style_set: far-ood} # H, synthetic images in far-OOD styles

``relative_to: pool`` (default): ``n_x = round(fraction_x * pool size_x)``;
``relative_to: real``: both counts are fractions of the number of real
training subjects, so ``R50S50`` has as many cases as ``R`` (the paper's
mixtures). Rounding is half-up; a positive share that rounds to no case is refused (R5S95 of
9 real subjects would be R0S100 under another name). Which cases are used is deterministic from
the seed and does not depend on the arm: every pool is shuffled once
(:func:`pool_order`) and an arm takes the first ``n`` of it, so subsets are
nested (R25 within R50 within R100) and the same for every task. ``style_set``
names a ``synthesis.style_sets`` entry: the arm's synthetic cases keep their
labels and take their images from that set (domain-shift arms).

The study's arms need more than two fractions, so a recipe may also give::

    R_les:  {n_real: 5, real_pool: {sites: [brats]}}        # few-shot: 5 real cases of one dataset
    R_fOD:  {real: 1.0, real_pool: {roles: [far_ood]}, modalities: [flair]}
    R0S100: {synthetic: 1.0, relative_to: real, sample_set: unseen}

``real_pool`` (a :func:`select_subjects` selector over the training split) replaces the
run's default real pool (``segmentation.real_pool``); ``n_real`` is an absolute count
instead of the ``real`` fraction; ``modalities`` are the images fed to the task's input
channels for this arm's training cases (R_fOD learns the tissue task from FLAIR);
``sample_set`` names a ``synthesis.sample_sets`` entry (label maps sampled with other
conditioning, e.g. the unseen WMH + tumour phenotype); ``generator`` (default ``brainspade``)
names the generator the synthetic cases come from: ``gmm`` takes the same label maps imaged
with domain-randomised Gaussian intensities per class (SynthSeg's generative model);
``lesion_insertion`` real healthy training subjects with lesions grown in; ``spade_diffusion``
the label maps imaged by a SPADE-normalised diffusion model. ``nnunet_seed`` (default the
run's seed) seeds the arm's nnU-Net training only: arms that differ in it alone train on the
same cases (replicates for a spread over seeds).

Tasks
-----
A task maps the schema's classes (``labels.classes``) to nnU-Net labels::

    tissue: {classes: {csf: [csf], gm: [gm], wm: [wm, wmh], ...}}
    tumour: {classes: {tumour: [necrotic, oedema, enhancing]}}
    wmh:    {classes: {wmh: [wmh]}, fp_tum: true}

Task label ``k`` (1..K, in the order given) is the union of its source
classes; every class not named is background. Predictions are mapped back to
schema values (each task label -> its first source class) and scored against
the original ground truth with the source classes grouped, so ``wm`` of the
tissue task is scored against ``wm + wmh`` voxels. ``fp_tum`` adds the share
of ground-truth tumour voxels (lesion type ``tumour``) predicted as the task's
first class.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np

from .errors import InputError, InputErrors

POOLS = ("real", "synthetic")
RECIPE_KEYS = ("relative_to", "n_real", "real_pool", "modalities", "sample_set", "style_set", "generator",
               "nnunet_seed")
# where an arm's synthetic cases come from: brainspade = the label generator's maps imaged by the
# SPADE image generator; gmm = the same maps imaged with domain-randomised Gaussian intensities;
# lesion_insertion = real healthy training subjects with lesions grown in; spade_diffusion = the
# label generator's maps imaged by a SPADE-normalised diffusion model
GENERATORS = ("brainspade", "gmm", "lesion_insertion", "spade_diffusion")
# generators that image another generator's label maps: that one's manifest holds the conditioning
LABEL_MAPS_FROM = {"gmm": "brainspade", "spade_diffusion": "brainspade"}
# generators whose sampling images only the modalities the run reads (a diffusion chain per
# modality and volume is their cost); the others image every modality of the run
IMAGES_ONLY_READ_MODALITIES = {"spade_diffusion"}
SELECTOR_KEYS = {"roles": "role", "sites": "site", "phenotypes": "phenotype"}
RELATIVE_TO = ("pool", "real")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SYNTH_PREFIX = "synth"


def synthetic_ids(n_samples):
    """``synth0001`` .. ``synthNNNN`` (the sample ids the generator rules write)."""
    return [f"{SYNTH_PREFIX}{i:04d}" for i in range(1, int(n_samples) + 1)]


def _round_half_up(x):
    return int(math.floor(x + 0.5 + 1e-9))


def arm_counts(recipe, n_real, n_synthetic, arm="?"):
    """``(n_real_cases, n_synthetic_cases)`` of one recipe; raises InputError when impossible."""
    field = f"segmentation.recipes.{arm}"
    unknown = set(recipe) - set(POOLS) - set(RECIPE_KEYS)
    if unknown:
        raise InputError(f"unknown recipe keys {sorted(unknown)}", field=field,
                         fix="use real, synthetic (fractions), " + ", ".join(RECIPE_KEYS))
    if "n_real" in recipe and "real" in recipe:
        raise InputError("gives both a real fraction and n_real", field=field, fix="keep one of them")
    rel = recipe.get("relative_to", "pool")
    if rel not in RELATIVE_TO:
        raise InputError(f"relative_to must be one of {RELATIVE_TO}, got {rel!r}", field=field,
                         fix="use 'pool' (fraction of each pool) or 'real' (fraction of the real pool size)")
    fr = {}
    for pool in POOLS:
        v = recipe.get(pool, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InputError(f"{pool} fraction must be a number >= 0, got {v!r}", field=field, fix="e.g. 0.5")
        fr[pool] = float(v)
    base = {"real": n_real, "synthetic": n_real if rel == "real" else n_synthetic}
    counts = {p: _round_half_up(fr[p] * base[p]) for p in POOLS}
    if "n_real" in recipe:
        v = recipe["n_real"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"n_real must be an integer >= 0, got {v!r}", field=f"{field}.n_real", fix="e.g. 5")
        counts["real"] = v
    if fr["real"] > 1.0 + 1e-9 or counts["real"] > n_real:
        raise InputError(f"asks for {counts['real']} real cases but its real pool holds {n_real} training subjects",
                         field=field, fix="use a real fraction <= 1 (n_real <= the pool), or widen real_pool")
    if counts["synthetic"] > n_synthetic:
        raise InputError(f"asks for {counts['synthetic']} synthetic cases but synthesis.n_samples is "
                         f"{n_synthetic}", field=field,
                         fix="raise synthesis.n_samples or lower the synthetic fraction")
    if counts["real"] + counts["synthetic"] == 0:
        raise InputError("selects no training case", field=field, fix="give a fraction > 0")
    for pool in POOLS:  # a mixture's share that rounds to no case: another arm under its name
        if fr[pool] > 0 and counts[pool] == 0:
            what = "real training subjects" if pool == "real" or rel == "real" else "synthetic samples"
            raise InputError(
                f"asks for a {pool} share of {fr[pool]:g} of {base[pool]} {what}, which rounds to 0 cases: "
                f"it would train without {pool} data", field=field,
                fix=f"give a {pool} share of at least {0.5 / base[pool]:.3g} (half a case rounds up), a pool of at "
                    f"least {math.ceil(0.5 / fr[pool] - 1e-9)}, or drop the arm" if base[pool] else
                    f"give the arm a {pool} pool, or drop the arm")
    return counts["real"], counts["synthetic"]


def pool_order(ids, seed, pool):
    """The pool's ids in a seeded random order (arm-independent; arms take a prefix)."""
    ids = sorted(str(i) for i in ids)
    rng = np.random.default_rng([int(seed), zlib.crc32(f"segmentation:{pool}".encode())])
    return [ids[i] for i in rng.permutation(len(ids))]


def arm_cases(recipe, real_ids, synthetic_ids_, seed, arm="?"):
    """``{"real": [...], "synthetic": [...]}``: the training cases of one arm (sorted)."""
    n_r, n_s = arm_counts(recipe, len(real_ids), len(synthetic_ids_), arm)
    real = sorted(pool_order(real_ids, seed, "real")[:n_r])
    synth = sorted(pool_order(synthetic_ids_, seed, "synthetic")[:n_s])
    clash = set(real) & set(synth)
    if clash:
        raise InputError(f"subject ids {sorted(clash)} are both real and synthetic case ids",
                         field="samples", fix=f"rename subjects starting with {SYNTH_PREFIX!r}")
    return {"real": real, "synthetic": synth}


def uses_synthetic(recipe):
    return float(recipe.get("synthetic", 0.0) or 0.0) > 0.0


def style_set(recipe, style_sets, arm="?"):
    """The synthetic image set an arm trains on: None for the sampled images, else the name of
    a ``synthesis.style_sets`` entry (the same synthetic labels in other sites' styles)."""
    name = recipe.get("style_set")
    if name is None:
        return None
    if name not in (style_sets or {}):
        raise InputError(f"style_set {name!r} is not defined", field=f"segmentation.recipes.{arm}.style_set",
                         fix=f"name one of synthesis.style_sets ({sorted(style_sets or {})}) or drop the key")
    if not uses_synthetic(recipe):
        raise InputError(f"style_set {name!r} given but the arm uses no synthetic case",
                         field=f"segmentation.recipes.{arm}", fix="give a synthetic fraction > 0 or drop style_set")
    if recipe.get("sample_set") is not None:
        raise InputError(f"style_set {name!r} restyles the main synthetic set, not sample_set "
                         f"{recipe['sample_set']!r}", field=f"segmentation.recipes.{arm}",
                         fix="use either style_set or sample_set")
    return name


def generator(recipe, arm="?"):
    """The generator an arm's synthetic cases come from (one of :data:`GENERATORS`)."""
    name = recipe.get("generator", GENERATORS[0])
    field = f"segmentation.recipes.{arm}"
    if name not in GENERATORS:
        raise InputError(f"generator {name!r} is not known", field=f"{field}.generator",
                         fix=f"use one of {list(GENERATORS)} or drop the key (default {GENERATORS[0]})")
    if name != GENERATORS[0] and not uses_synthetic(recipe):
        raise InputError(f"generator {name!r} given but the arm uses no synthetic case", field=field,
                         fix="give a synthetic fraction > 0 or drop generator")
    if name != GENERATORS[0] and recipe.get("style_set") is not None:
        raise InputError(f"style_set {recipe['style_set']!r} restyles with the SPADE image generator, not "
                         f"generator {name!r}", field=field, fix="use either style_set or generator")
    return name


def training_seed(recipe, default, arm="?"):
    """The nnU-Net training seed of an arm: its recipe's ``nnunet_seed`` (replicate arms on the
    same cases), else the run's seed."""
    seed = recipe.get("nnunet_seed", default)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"nnunet_seed must be a non-negative integer, got {seed!r}",
                         field=f"segmentation.recipes.{arm}.nnunet_seed", fix="e.g. 1")
    return seed


def style_set_subjects(rows, style_sets):
    """Subjects whose images style each ``synthesis.style_sets`` entry: those whose site role
    or site is listed. ``rows``: ``{subject: {"site", "role"?}}``. Sets no subject matches
    are left out of the result (the caller decides whether that is an error)."""
    found = {}
    for name, keys in (style_sets or {}).items():
        keys = {str(k) for k in keys}
        subjects = [s for s, row in rows.items()
                    if str(row.get("role")) in keys or str(row.get("site")) in keys]
        if subjects:
            found[name] = subjects
    return found


def drop_flagged_samples(cases, sample_qc_path):
    """``cases`` (case id -> spec) without the synthetic ones flagged by the per-sample QC
    table; returns ``(kept cases, sorted dropped ids)``. An arm left without cases is an error."""
    import pandas as pd

    qc = pd.read_csv(sample_qc_path, sep="\t", dtype={"sample": str})
    if not {"sample", "flagged"} <= set(qc.columns):
        raise InputError("the sample QC table has no 'sample' / 'flagged' column", file=sample_qc_path,
                         fix="rerun the synthetic_sample_qc rule")
    flagged = set(qc.loc[qc["flagged"].astype(str).str.lower() == "true", "sample"])
    dropped = sorted(c for c, spec in cases.items() if spec["source"] == "synthetic" and c in flagged)
    kept = {c: spec for c, spec in cases.items() if c not in dropped}
    if not kept:
        raise InputError(f"every training case of this arm is a flagged synthetic sample ({len(dropped)})",
                         file=sample_qc_path, field="synthesis.qc.drop_flagged",
                         fix="set synthesis.qc.drop_flagged: false, or improve the generators (see the sample QC table)")
    return kept, dropped


def select_subjects(rows, selector, split, field):
    """Sorted subjects of ``split`` whose sample-sheet row matches every key of ``selector``
    (``roles``, ``sites``, ``phenotypes``: lists of accepted values; an empty selector takes
    the whole split). ``rows``: ``{subject: {"split", "site", "role"?, "phenotype"?}}``."""
    selector = selector or {}
    if not isinstance(selector, dict):
        raise InputError(f"must be a mapping, got {selector!r}", field=field,
                         fix="e.g. {roles: [in_distribution], phenotypes: [wmh]}")
    unknown = set(selector) - set(SELECTOR_KEYS)
    if unknown:
        raise InputError(f"unknown selector keys {sorted(unknown)}", field=field,
                         fix=f"use {sorted(SELECTOR_KEYS)}")
    for key, column in SELECTOR_KEYS.items():
        if key in selector and rows and not any(row.get(column) not in (None, "") for row in rows.values()):
            raise InputError(f"selects by {key} but no subject has a {column!r}", field=f"{field}.{key}",
                             fix=f"add a {column!r} column to the sample sheet, or drop {key}")
    wanted = {SELECTOR_KEYS[k]: {str(v) for v in (vals if isinstance(vals, list) else [vals])}
              for k, vals in selector.items()}
    return sorted(s for s, row in rows.items() if str(row.get("split")) == split
                  and all(str(row.get(col)) in vals for col, vals in wanted.items()))


def _check_modalities(mods, modalities, field):
    stray = [m for m in mods if m not in modalities]
    if stray:
        raise InputError(f"modalities {stray} are not among the run's modalities {list(modalities)}",
                         field=field, fix="name modalities listed under modalities:")


def arm_modalities(recipe, task_modalities, modalities, arm="?"):
    """The images an arm's training cases feed into the task's input channels: the recipe's
    ``modalities`` or the task's; as many as the task has channels, each one of the run's."""
    mods = list(recipe.get("modalities") or task_modalities)
    field = f"segmentation.recipes.{arm}.modalities"
    _check_modalities(mods, modalities, field)
    if len(mods) != len(task_modalities):
        raise InputError(f"{len(mods)} modalities {mods} for a task with {len(task_modalities)} input channels "
                         f"{list(task_modalities)}", field=field, fix="give one modality per channel")
    return mods


def check_modalities_available(what, subjects, wanted, subject_modalities, field, fix):
    """InputError when some of ``subjects`` lack a modality in ``wanted`` (a T1-only or
    FLAIR-only dataset, config ``site_modalities``): names ``what``, how many, one example."""
    short = {s: [m for m in wanted if m not in subject_modalities[s]] for s in subjects}
    short = {s: ms for s, ms in short.items() if ms}
    if short:
        s, ms = next(iter(short.items()))
        raise InputError(f"{what} needs {list(wanted)}, but {len(short)} of its {len(subjects)} subjects lack "
                         f"some (e.g. {s} has no {', '.join(ms)})", subject=s, field=field, fix=fix)


def task_inputs(task_cfg, modalities, test_set_names, task="?"):
    """``(channels, {test set: modalities})`` of a task: its input modalities (default: all
    of the run's), the test sets its arms are scored on (default: all) and the images fed to
    the channels per test set (``test_modalities``, default: the channels' modalities)."""
    field = f"segmentation.task_definitions.{task}"
    channels = list(task_cfg.get("modalities") or modalities)
    _check_modalities(channels, modalities, f"{field}.modalities")
    sets = list(task_cfg.get("test_sets") or test_set_names)
    unknown = [t for t in sets if t not in test_set_names]
    if unknown:
        raise InputError(f"test sets {unknown} do not exist (test sets: {list(test_set_names)})",
                         field=f"{field}.test_sets", fix="name test sets of segmentation.test_sets / test_sets_by")
    # entries for test sets the run does not have (QC left all their subjects out) are moot
    per_set = {t: m for t, m in (task_cfg.get("test_modalities") or {}).items() if t in test_set_names}
    stray = [t for t in per_set if t not in sets]
    if stray:
        raise InputError(f"test_modalities for {stray}, which the task is not scored on", field=f"{field}.test_modalities",
                         fix=f"use test sets of the task: {sets}")
    out = {}
    for t in sets:
        mods = list(per_set.get(t) or channels)
        if len(mods) != len(channels) or any(m not in modalities for m in mods):
            raise InputError(f"test set {t!r}: {mods} do not fill the task's channels {channels} with the run's "
                             f"modalities", field=f"{field}.test_modalities.{t}", fix="give one modality per channel")
        out[t] = mods
    return channels, out


def dataset_id(task, arm, base=100):
    """nnU-Net dataset id of a (task, arm): ``base`` + a checksum of the pair's name, in ``base..999``.

    Every arm has its own nnU-Net roots, so the id only has to be valid there; derived from the
    name, it does not move when arms are added, removed or reordered (a moved id renames the
    arm's nnU-Net folders and retrains it).
    """
    if not 1 <= int(base) <= 999:
        raise InputError(f"dataset id base {base} is outside 1..999", field="segmentation.nnunet.dataset_id_base",
                         fix="use a base between 1 and 999")
    return int(base) + zlib.crc32(f"{task}/{arm}".encode()) % (1000 - int(base))


def dataset_name(task, arm):
    return f"{task}-{arm}"


# --------------------------------------------------------------------------- tasks
def task_classes(task_cfg, schema, task="?"):
    """``{task class: [schema values]}`` in task-label order (label k = position + 1)."""
    classes = task_cfg.get("classes") or {}
    if not classes:
        raise InputError("task defines no classes", field=f"segmentation.task_definitions.{task}.classes",
                         fix="e.g. {tumour: [necrotic, oedema, enhancing]}")
    out, seen = {}, {}
    for name, sources in classes.items():
        if name == "background":
            raise InputError("'background' is implicit", field=f"segmentation.task_definitions.{task}.classes",
                             fix="list only foreground classes")
        sources = [sources] if isinstance(sources, str) else list(sources)
        vals = []
        for s in sources:
            if s not in schema.classes or s == "background":
                raise InputError(f"class {name!r}: unknown schema class {s!r}",
                                 field=f"segmentation.task_definitions.{task}.classes",
                                 fix=f"use classes of labels.classes: {[c for c in schema.names if c != 'background']}")
            if s in seen:
                raise InputError(f"schema class {s!r} is mapped to both {seen[s]!r} and {name!r}",
                                 field=f"segmentation.task_definitions.{task}.classes", fix="map it once")
            seen[s] = name
            vals.append(int(schema.value(s)))
        out[str(name)] = vals
    return out


def nnunet_labels(groups):
    """nnU-Net ``labels`` of a task: ``{"background": 0, class: k}``."""
    return {"background": 0, **{name: k for k, name in enumerate(groups, start=1)}}


def forward_lut(groups, n_schema_classes):
    """uint8 lookup table schema value -> task label."""
    lut = np.zeros(int(n_schema_classes), np.uint8)
    for k, vals in enumerate(groups.values(), start=1):
        lut[vals] = k
    return lut


def inverse_lut(groups):
    """uint8 lookup table task label -> schema value (the first source class)."""
    return np.array([0] + [vals[0] for vals in groups.values()], np.uint8)


def apply_lut(label, lut, what="label"):
    arr = np.asarray(label)
    if arr.size and (arr.min() < 0 or arr.max() >= len(lut)):
        raise InputError(f"{what} has values outside 0..{len(lut) - 1} (found {int(arr.min())}..{int(arr.max())})",
                         fix="check the label schema (labels.classes)")
    return lut[arr.astype(np.int64)]


def remap_label_file(src, dst, lut):
    """Write ``lut[label]`` of NIfTI ``src`` to ``dst`` (uint8, same geometry), atomically."""
    import nibabel as nib

    from .io import save_nifti

    img = nib.load(str(src))
    out = apply_lut(np.asarray(img.dataobj), lut, what=str(src))
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    return save_nifti(out.astype(np.uint8), img.affine, dst, dtype=np.uint8, header=header)


def check_foreground(voxels_per_case, task="?", arm="?"):
    """Class names without any voxel in an arm's training set; InputError if no class has one.

    ``voxels_per_case``: ``{case_id: {class: voxel count}}``. nnU-Net cannot plan a
    dataset without foreground (its fingerprint collects foreground intensities).
    """
    totals = {}
    for counts in voxels_per_case.values():
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + int(n)
    if not any(totals.values()):
        raise InputError(f"the {len(voxels_per_case)} training case(s) of arm {arm!r} contain no voxel of the "
                         f"{task!r} classes {sorted(totals)}", field=f"segmentation.recipes.{arm}",
                         fix="give the arm more cases (a larger fraction) or check the labels")
    return sorted(n for n, v in totals.items() if v == 0)


def fp_tum_spec(task_cfg, groups, schema):
    """``{"wmh": [values], "tumour": [values]}`` for :func:`brainsynth.metrics.score_cohort` or None."""
    if not task_cfg.get("fp_tum"):
        return None
    tum = schema.lesion_types.get("tumour")
    if not tum:
        raise InputError("fp_tum needs a lesion type 'tumour'", field="labels.lesion_types",
                         fix="declare tumour classes or drop fp_tum")
    first = next(iter(groups.values()))
    return {"wmh": [first[0]], "tumour": [int(schema.value(c)) for c in tum]}


# --------------------------------------------------------------------------- test sets
ROLE_ORDER = ("in_distribution", "near_ood", "far_ood")


def test_sets(subjects, by="role"):
    """``{test set: [subjects]}`` of the ``split == test`` subjects, grouped by column ``by``.

    Falls back to ``site`` when the table has no column ``by`` (user sheets);
    empty cells form the set ``test``. Order: the site roles
    in_distribution, near_ood, far_ood first, then others as they appear
    (subjects sorted).
    """
    df = subjects.reset_index(drop=True)
    df = df[df["split"] == "test"].sort_values("subject")
    col = by if by in df.columns else "site"
    out = {}
    for s, v in zip(df["subject"], df[col]):
        key = str(v) if isinstance(v, str) and v else "test"
        if not NAME_RE.match(key):
            raise InputError(f"test set name {key!r} (column {col!r}) is not a valid folder name",
                             subject=str(s), field="segmentation.test_sets_by",
                             fix="use letters, digits, '_' and '-'")
        out.setdefault(key, []).append(str(s))
    rank = {r: i for i, r in enumerate(ROLE_ORDER)}
    keys = sorted(out, key=lambda k: (rank.get(k, len(rank)), list(out).index(k)))
    return {k: out[k] for k in keys}


def defined_test_sets(rows, definitions):
    """``{test set: [subjects]}`` from ``segmentation.test_sets`` (name -> selector over the
    test split, see :func:`select_subjects`), in the order given; a set without subjects is
    an error (a table with an empty row says nothing)."""
    out = {}
    for name, selector in definitions.items():
        field = f"segmentation.test_sets.{name}"
        if not NAME_RE.match(str(name)):
            raise InputError(f"test set name {name!r} is not a valid folder name", field=field,
                             fix="use letters, digits, '_' and '-'")
        out[str(name)] = select_subjects(rows, selector, "test", field)
        if not out[str(name)]:
            raise InputError("selects no test subject", field=field,
                             fix="check its roles / sites / phenotypes against the subject table")
    return out


def subject_classes(label_classes, tissue_from_atropos, tissues):
    """Schema classes a preprocessed subject will hold: those of its label map
    (space-separated names, as the input check lists them), plus the tissue classes when
    Atropos makes its tissue (no label map, or one with lesions only, as BraTS)."""
    names = set(str(label_classes or "").split())
    if tissue_from_atropos:
        names |= set(tissues)
    return names - {"background"}


def classes_from_input_check(path, tissues):
    """subject -> :func:`subject_classes`, from the input check's summary table
    (``validate_inputs``); None for a table written before it recorded label contents."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "label_classes" not in table:
        return None
    return {s: subject_classes(c, t == "atropos", tissues)
            for s, c, t in zip(table["subject"], table["label_classes"], table["tissue_from"])}


def check_task_pools(pools, subject_classes_):
    """Stop a design whose arms cannot see any foreground of their task, before any work.

    ``pools``: ``{task: {"classes": [schema classes of the task's foreground], "arms": {arm:
    {"real": [subjects], "generator": [subjects the generator learns from, [] when the arm
    has no synthetic cases]}}}}``; ``subject_classes_``: subject -> set of schema classes
    (from the input check). nnU-Net cannot plan a dataset without foreground, and a
    generator cannot make a lesion it never saw. Returns one row per (task, arm) with the
    number of subjects holding the task's classes; raises InputErrors naming task and arms.
    """
    rows, errors = [], []
    for task, spec in pools.items():
        wanted = set(spec["classes"])
        empty = []
        for arm, pool in spec["arms"].items():
            n_real = sum(bool(subject_classes_.get(s, set()) & wanted) for s in pool["real"])
            n_gen = sum(bool(subject_classes_.get(s, set()) & wanted) for s in pool["generator"])
            rows.append({"task": task, "arm": arm, "real_with_foreground": n_real,
                         "generator_subjects_with_foreground": n_gen})
            if n_real == 0 and n_gen == 0:
                empty.append(arm)
        if empty:
            errors.append(InputError(
                f"task {task!r}: arms {empty} get no training case with any of {sorted(wanted)} (no real training "
                "subject of theirs has it, and no subject the generator learns from has it)",
                field=f"segmentation.tasks / task_definitions.{task}.exclude_arms",
                fix=f"drop {task!r} from segmentation.tasks, leave the arms out for it (exclude_arms), or add "
                    "training subjects whose label maps hold those classes"))
    if errors:
        raise InputErrors(errors)
    return rows
