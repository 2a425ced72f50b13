"""The embedded demo cohort: a seeded plan and synthetic subjects in native space.

Why: the workflow and its tests must run end to end without patient data. The
plan (:func:`plan_cohort`) is pure and cheap so the Snakefile can call it at
parse time; :func:`synthesize_subject` warps the 1 mm MNI atlas of
:mod:`brainsynth.template` (random affine + smooth deformation), adds tumour /
WMH lesions and renders T1/T2/FLAIR with skull, scalp, bias field and noise in
an oblique "scanner" space, so preprocessing has real work to do. Everything
is deterministic from (seed, subject).
"""

import math
import re
import zlib

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError
from .io import save_nifti
from . import template as tpl

ROLES = ("in_distribution", "near_ood", "far_ood")
PHENOTYPES = ("healthy", "tumour", "wmh", "both")
PLAN_COLUMNS = ["subject", "site", "role", "split", "phenotype"]
_SITE_KEYS = ("role", "n", "n_test", "noise", "voxel_scale", "contrast_jitter")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Deformation and appearance parameters of the synthetic subjects.
MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_TRANSLATION_MM = 5.0
DEFORM_SPACING_MM = 32.0
DEFORM_STD_MM = (1.5, 3.0)
OBLIQUE_DEG = 12.0
BIAS_AMPLITUDE = 0.2
FOV_MARGIN_MM = 6.0


def _stable_int(text):
    return zlib.crc32(str(text).encode("utf-8"))


def _rng(seed, *keys):
    return np.random.default_rng([int(seed)] + [_stable_int(k) for k in keys])


# ---------------------------------------------------------------- plan


def _num(value, field, lo=None, hi=None, integer=False, lo_open=False):
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(float(value))):
        kind = "an integer" if integer else "a number"
        raise InputError(f"must be {kind}, got {value!r}", field=field)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InputError(f"must be {'>' if lo_open else '>='} {lo}, got {value!r}", field=field)
    if hi is not None and value > hi:
        raise InputError(f"must be <= {hi}, got {value!r}", field=field)
    return value


def validate_demo(demo_cfg):
    """Check the ``demo:`` config section; raise InputError naming the field."""
    if not isinstance(demo_cfg, dict):
        raise InputError("must be a mapping", field="demo")
    _num(demo_cfg.get("native_voxel_mm"), "demo.native_voxel_mm", lo=0.5, hi=10.0)
    sites = demo_cfg.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise InputError("must map site names to settings", field="demo.sites",
                         fix="e.g. site_a: {role: in_distribution, n: 16, n_test: 4, ...}")
    for name, s in sites.items():
        f = f"demo.sites.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InputError(f"site name {name!r} must be letters, digits, '_', '.', '-'", field=f)
        if not isinstance(s, dict):
            raise InputError("must be a mapping", field=f)
        missing = [k for k in _SITE_KEYS if k not in s]
        if missing:
            raise InputError(f"missing {missing}", field=f, fix=f"give {list(_SITE_KEYS)}")
        if s["role"] not in ROLES:
            raise InputError(f"role {s['role']!r} is not one of {list(ROLES)}", field=f"{f}.role")
        n = _num(s["n"], f"{f}.n", lo=1, integer=True)
        n_test = _num(s["n_test"], f"{f}.n_test", lo=0, integer=True)
        if n_test > n:
            raise InputError(f"n_test={n_test} is larger than n={n}", field=f"{f}.n_test",
                             fix="n_test must be between 0 and n")
        _num(s["noise"], f"{f}.noise", lo=0.0, hi=0.5)
        _num(s["voxel_scale"], f"{f}.voxel_scale", lo=0.25, hi=4.0)
        _num(s["contrast_jitter"], f"{f}.contrast_jitter", lo=0.0, hi=1.0)
        if "anisotropy" in s:
            _num(s["anisotropy"], f"{f}.anisotropy", lo=0.5, hi=3.0)
        if not isinstance(s.get("skull_stripped", False), bool):
            raise InputError(f"must be true or false, got {s['skull_stripped']!r}", field=f"{f}.skull_stripped")
        own = s.get("own_grid", [])
        if not isinstance(own, list) or any(m not in ("t2", "flair", "t1ce") for m in own):
            raise InputError(f"must list modalities among t2, flair, t1ce, got {own!r}", field=f"{f}.own_grid",
                             fix="e.g. [flair] (the T1 defines the subject's grid)")
    total = sum(int(s["n"]) for s in sites.values())
    if demo_cfg.get("n_subjects") is not None:
        n_subj = _num(demo_cfg["n_subjects"], "demo.n_subjects", lo=1, integer=True)
        if n_subj != total:
            raise InputError(f"n_subjects={n_subj} but the sites add up to {total}",
                             field="demo.n_subjects", fix=f"set n_subjects: {total} or change the sites' n")
    if all(int(s["n_test"]) == int(s["n"]) for s in sites.values()):
        raise InputError("no site has training subjects (n_test == n everywhere)", field="demo.sites",
                         fix="give the in-distribution site n_test < n")
    _check_lesions(demo_cfg.get("lesions"), "demo.lesions")
    for name, s in sites.items():
        if "lesions" in s:
            _check_lesions(s["lesions"], f"demo.sites.{name}.lesions")
    return demo_cfg


def _check_lesions(lesions, field):
    if not isinstance(lesions, dict):
        raise InputError("must map phenotypes to fractions", field=field,
                         fix="e.g. {tumour: 0.35, wmh: 0.35, both: 0.15}")
    unknown = set(lesions) - {"tumour", "wmh", "both"}
    if unknown:
        raise InputError(f"unknown phenotypes {sorted(unknown)}", field=field,
                         fix="use tumour, wmh, both (the rest are healthy)")
    for k, v in lesions.items():
        _num(v, f"{field}.{k}", lo=0.0, hi=1.0)
    if sum(float(v) for v in lesions.values()) > 1.0 + 1e-9:
        raise InputError(f"fractions add up to {sum(lesions.values()):.3g} > 1", field=field,
                         fix="make tumour + wmh + both <= 1 (the rest are healthy)")


def site_table(demo_cfg):
    """One row per site: role, n, n_test, noise, contrast_jitter, native voxel size (mm)."""
    validate_demo(demo_cfg)
    base = float(demo_cfg["native_voxel_mm"])
    rows = []
    for name, s in demo_cfg["sites"].items():
        vs = _site_voxel_mm(demo_cfg, name)
        rows.append({"site": name, "role": s["role"], "n": int(s["n"]), "n_test": int(s["n_test"]),
                     "n_train": int(s["n"]) - int(s["n_test"]), "noise": float(s["noise"]),
                     "contrast_jitter": float(s["contrast_jitter"]),
                     "voxel_scale": float(s["voxel_scale"]), "native_voxel_mm": base * float(s["voxel_scale"]),
                     "voxel_x_mm": vs[0], "voxel_y_mm": vs[1], "voxel_z_mm": vs[2]})
    return pd.DataFrame(rows)


def _site_voxel_mm(demo_cfg, site):
    s = demo_cfg["sites"][site]
    v = float(demo_cfg["native_voxel_mm"]) * float(s["voxel_scale"])
    return (v, v, v * float(s.get("anisotropy", 1.0)))


def _phenotype_counts(n, lesions, minimum):
    """Largest-remainder counts per phenotype, then minimums (best effort)."""
    frac = {"tumour": float(lesions.get("tumour", 0.0)), "wmh": float(lesions.get("wmh", 0.0)),
            "both": float(lesions.get("both", 0.0))}
    frac["healthy"] = max(0.0, 1.0 - sum(frac.values()))
    raw = {k: n * frac[k] for k in PHENOTYPES}
    counts = {k: int(math.floor(raw[k] + 1e-9)) for k in PHENOTYPES}
    order = sorted(PHENOTYPES, key=lambda k: (-(raw[k] - counts[k]), PHENOTYPES.index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    for need in minimum:  # in priority order
        if counts[need] >= 1:
            continue
        donors = [k for k in sorted(PHENOTYPES, key=lambda k: -counts[k])
                  if counts[k] > (1 if k in minimum else 0)]
        if donors:
            counts[donors[0]] -= 1
            counts[need] += 1
    return counts


def plan_cohort(demo_cfg, seed):
    """The demo cohort plan: one row per subject, no image work (parse-time safe).

    Columns ``subject`` (demo001...), ``site``, ``role``, ``split`` (train/test)
    and ``phenotype`` (healthy/tumour/wmh/both). Subjects are numbered in site
    order; which of a site's subjects are test, and who gets which phenotype,
    is drawn from ``seed``. Phenotype counts follow the site's ``lesions`` (else
    ``demo.lesions``; largest remainder) per site and split, with at least one
    tumour and one wmh subject in every such group and one 'both' among the
    training subjects (as far as the group size allows), for the phenotypes whose
    fraction is above 0 (a site of one dataset: BraTS-like tumours only).
    """
    validate_demo(demo_cfg)
    total = sum(int(s["n"]) for s in demo_cfg["sites"].values())
    width = max(3, len(str(total)))
    rows = []
    k = 0
    for site, s in demo_cfg["sites"].items():
        n, n_test = int(s["n"]), int(s["n_test"])
        lesions = s.get("lesions", demo_cfg["lesions"])
        names = [f"demo{k + i + 1:0{width}d}" for i in range(n)]
        k += n
        rng = _rng(seed, "plan", site)
        perm = rng.permutation(n)
        test_idx = set(perm[:n_test].tolist())
        for split in ("train", "test"):
            members = [i for i in range(n) if (i in test_idx) == (split == "test")]
            if not members:
                continue
            minimum = ("tumour", "wmh", "both") if split == "train" else ("tumour", "wmh")
            minimum = tuple(p for p in minimum if float(lesions.get(p, 0.0)) > 0)
            counts = _phenotype_counts(len(members), lesions, minimum)
            phen = [p for p in PHENOTYPES for _ in range(counts[p])]
            phen = [phen[j] for j in rng.permutation(len(phen))]
            for i, p in zip(members, phen):
                rows.append({"subject": names[i], "site": site, "role": s["role"], "split": split,
                             "phenotype": p})
    df = pd.DataFrame(rows, columns=PLAN_COLUMNS).sort_values("subject", kind="stable")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- synthesis


def _rotation(angles_deg):
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_pose(rng):
    """Atlas (MNI mm) -> subject world mm: rotation, per-axis scale, translation."""
    m = np.eye(4)
    m[:3, :3] = _rotation(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)) @ np.diag(
        rng.uniform(*SCALE_RANGE, 3))
    m[:3, 3] = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    return m


def _head_box(atlas, margin):
    return atlas.brain_lo - margin, atlas.brain_hi + margin


def _native_grid(atlas, pose, voxel_mm, rng):
    """Oblique native affine and shape whose field of view covers the head."""
    head = sum(tpl.HEAD_THICKNESS_MM.values()) * 1.2
    lo, hi = _head_box(atlas, head + FOV_MARGIN_MM)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    world = pose[:3, :3] @ corners + pose[:3, 3:4]
    rot = _rotation(rng.uniform(-OBLIQUE_DEG, OBLIQUE_DEG, 3))
    local = rot.T @ world
    vs = np.asarray(voxel_mm, float)
    llo, lhi = local.min(1), local.max(1)
    shape = tuple(int(x) for x in np.ceil((lhi - llo) / vs).astype(int) + 1)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(vs)
    aff[:3, 3] = rot @ llo
    return aff, shape


def _deformation(atlas, rng):
    """Random smooth displacement (mm) on a coarse control grid over the head."""
    lo, hi = _head_box(atlas, 40.0)
    n = np.maximum(np.ceil((hi - lo) / DEFORM_SPACING_MM).astype(int) + 1, 2)
    std = rng.uniform(*DEFORM_STD_MM)
    ctrl = rng.normal(0.0, std, size=(3,) + tuple(n))
    coeffs = np.stack([ndimage.spline_filter(c, order=3, mode="nearest") for c in ctrl])
    step = (hi - lo) / (n - 1)
    return coeffs, lo, step


def _pullback(shape, m, coeffs, lo, step, stride=4):
    """Atlas mm of every native voxel: linear map ``m`` plus the displacement.

    The (smooth) displacement is evaluated with cubic splines on every
    ``stride``-th native voxel and interpolated linearly in between (fast).
    """
    cshape = tuple(int(math.ceil((s - 1) / stride)) + 1 for s in shape)
    cidx = np.indices(cshape, dtype=np.float64).reshape(3, -1) * stride
    vox = (m[:3, :3] @ cidx + m[:3, 3:4] - lo[:, None]) / step[:, None]
    disp_c = [ndimage.map_coordinates(c, vox, order=3, mode="nearest", prefilter=False).reshape(cshape)
              for c in coeffs]
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    q = m[:3, :3] @ idx + m[:3, 3:4]
    idx *= 1.0 / stride
    for i in range(3):
        q[i] += ndimage.map_coordinates(disp_c[i], idx, order=1, mode="nearest")
    return q


def _blob_mask(q, centre, radii, rot, rng, irregularity, cells=5):
    """Points (indices into q's columns) inside an irregular ellipsoid; returns (idx, r_norm)."""
    rmax = float(np.max(radii)) * 1.6 + 1.0
    near = np.flatnonzero(np.all(np.abs(q - centre[:, None]) <= rmax, axis=0))
    d = rot.T @ (q[:, near] - centre[:, None])
    r = np.sqrt(((d / np.asarray(radii)[:, None]) ** 2).sum(0))
    field = ndimage.spline_filter(rng.normal(0.0, 1.0, (cells,) * 3), order=3, mode="nearest")
    vox = (d / rmax + 1.0) * (cells - 1) / 2.0
    w = ndimage.map_coordinates(field, vox, order=3, mode="nearest", prefilter=False)
    r_norm = r / np.clip(1.0 + irregularity * w, 0.5, 1.6)
    return near, r_norm


def _lesions(q, base, phenotype, atlas, rng, code):
    """Internal lesion codes at points q (atlas mm) given the pre-lesion atlas label."""
    les = np.zeros(q.shape[1], np.uint8)
    brain = base > 0
    if phenotype in ("wmh", "both"):
        cands = atlas.wmh_centres
        for _ in range(int(rng.integers(4, 9))):
            c = cands[rng.integers(len(cands))].astype(float)
            r = rng.uniform(3.0, 7.0)
            radii = r * rng.uniform(0.7, 1.4, 3)
            near, rn = _blob_mask(q, c, radii, _rotation(rng.uniform(-90, 90, 3)), rng, 0.2, cells=4)
            hit = near[(rn <= 1.0) & (base[near] == code["wm"])]
            les[hit] = code["wmh"]
    if phenotype in ("tumour", "both"):
        cands = atlas.tumour_centres
        side = rng.choice([-1.0, 1.0])
        cands = cands[np.sign(cands[:, 0]) == side]
        c = cands[rng.integers(len(cands))].astype(float)
        R = rng.uniform(10.0, 16.0)
        oedema_r = R + rng.uniform(5.0, 10.0)
        rot = _rotation(rng.uniform(-90, 90, 3))
        radii = np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)])
        near, rn = _blob_mask(q, c, radii * oedema_r, rot, rng, 0.25)
        hemi = side * q[0, near] > 0.0
        ok = hemi & brain[near]
        wmlike = np.isin(base[near], (code["wm"], code["deep_gm"]))
        oed = near[ok & (rn <= 1.0) & wmlike]
        les[oed] = code["oedema"]
        near, rn = _blob_mask(q, c, radii * R, rot, rng, 0.2)
        ok = (side * q[0, near] > 0.0) & brain[near]
        core = rn <= rng.uniform(0.45, 0.6)
        les[near[ok & (rn <= 1.0)]] = code["enhancing"]
        les[near[ok & core]] = code["necrotic"]
    return les


def _bias_field(rng, shape):
    """Smooth multiplicative field, 1 +- BIAS_AMPLITUDE at most (cubic polynomial)."""
    axes = [np.linspace(-1.0, 1.0, s) for s in shape]
    basis = [np.stack([np.ones_like(a), a, a ** 2 - 1.0 / 3, a ** 3 - 0.6 * a]) for a in axes]
    order = np.arange(4)
    c = rng.normal(0.0, 1.0, (4, 4, 4)) / (1.0 + order[:, None, None] + order[None, :, None] + order)
    c[0, 0, 0] = 0.0
    f = np.einsum("ijk,ix,jy,kz->xyz", c, *basis, optimize=True)
    f /= max(np.abs(f).max(), 1e-6)
    return (1.0 + BIAS_AMPLITUDE * rng.uniform(0.6, 1.0) * f).astype(np.float32)


_TIED = {"deep_gm": ("gm", "wm"), "brainstem": ("gm", "wm"), "ext_csf": ("csf", None)}


def _contrast_means(demo_cfg, site, seed, subject_rng, contrast):
    """Intensity model with a fixed per-site and a smaller per-subject jitter.

    Each independent class mean is multiplied by exp(j * N(0, 1)) for the site
    (j = contrast_jitter) and by exp(j / 4 * N(0, 1)) for the subject; deep
    GM and brainstem stay the same GM/WM mixture and extra-cerebral CSF
    follows CSF, so anatomy remains coherent under strong jitter.
    """
    jit = float(demo_cfg["sites"][site]["contrast_jitter"])
    base = tpl.INTENSITY_MODEL[contrast]
    site_rng = _rng(seed, "contrast", site, contrast)
    out = {}
    for name in sorted(base):
        f_site = math.exp(jit * site_rng.normal())
        f_subj = math.exp(0.25 * jit * subject_rng.normal())
        out[name] = base[name] * f_site * f_subj
    for name, (a, b) in _TIED.items():
        if b is None:
            out[name] = out[a] * base[name] / base[a]
        else:
            w = (base[name] - base[b]) / (base[a] - base[b]) if base[a] != base[b] else 0.5
            out[name] = w * out[a] + (1.0 - w) * out[b]
    out["background"] = 0.0
    return out


def synthesize_subject(subject_row, demo_cfg, schema, seed, out, atlas=None):
    """Render one demo subject in its own native space and write it.

    ``subject_row``: mapping (or pandas row) with ``subject``, ``site`` and
    ``phenotype``. ``out`` maps ``t1``, ``t2``, ``flair`` (also ``t1ce``),
    ``label`` and ``brain_mask`` to paths; keys that are absent are skipped
    (the random draws do not depend on which). Images are float32, label and
    mask uint8 (schema values; mask = label > 0), all on one oblique affine.
    ``schema``: LabelSchema, the config's ``labels`` mapping, or None (default).
    ``atlas``: a ``template.save_atlas`` file (None: built here from nilearn's maps).
    Returns a summary dict (affine, shape, voxel size, lesion voxel counts).
    """
    schema = tpl.as_schema(schema)
    row = dict(subject_row)
    subject, site, phen = row.get("subject"), row.get("site"), row.get("phenotype")
    validate_demo(demo_cfg)
    if site not in demo_cfg["sites"]:
        raise InputError(f"unknown site {site!r}", subject=subject, field="demo.sites")
    if phen not in PHENOTYPES:
        raise InputError(f"phenotype {phen!r} is not one of {list(PHENOTYPES)}", subject=subject)
    contrasts = [k for k in out if k in tpl.INTENSITY_MODEL]
    unknown = set(out) - set(contrasts) - {"label", "brain_mask"}
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}")
    lut = tpl.label_lut(schema)
    atlas = tpl.load_atlas(None if atlas is None else str(atlas))
    site_cfg = demo_cfg["sites"][site]
    rng = _rng(seed, "subject", subject)

    pose = _random_pose(rng)
    voxel_mm = _site_voxel_mm(demo_cfg, site)
    aff, shape = _native_grid(atlas, pose, voxel_mm, rng)
    coeffs, dlo, dstep = _deformation(atlas, rng)
    m = np.linalg.inv(pose) @ aff                       # native voxel -> atlas mm (linear part)
    q = _pullback(shape, m, coeffs, dlo, dstep)
    base, frac, sdist = tpl.sample_atlas(atlas, q)
    thickness = {k: t * rng.uniform(0.85, 1.15) for k, t in tpl.HEAD_THICKNESS_MM.items()}

    code = tpl.ATLAS_CODES
    want = {"tumour": ("necrotic", "oedema", "enhancing"), "wmh": ("wmh",),
            "both": ("necrotic", "oedema", "enhancing", "wmh"), "healthy": ()}[phen]
    lesion_rng = _rng(seed, "lesions", subject)
    for attempt in range(20):
        les = _lesions(q, base, phen, atlas, lesion_rng, code)
        present = set(np.unique(les).tolist())
        if all(code[w] in present for w in want):
            break
    else:  # pragma: no cover - guarded by the retry loop
        raise RuntimeError(f"{subject}: could not place {phen} lesions on the native grid")
    internal = np.where(les > 0, les, base)
    label = lut[internal].reshape(shape)
    images = {}
    for contrast in contrasts:
        crng = _rng(seed, "image", subject, contrast)
        means = _contrast_means(demo_cfg, site, seed, crng, contrast)
        img = tpl.model_intensity(frac, sdist, means, thickness)
        if les.any():
            lut_l = np.zeros(256, np.float32)
            for name in ("wmh", "necrotic", "oedema", "enhancing"):
                lut_l[code[name]] = means[name]
            sel = les > 0
            img[sel] = 0.85 * lut_l[les[sel]] + 0.15 * img[sel]  # keep a little texture
        img = img.reshape(shape)
        img = ndimage.gaussian_filter(img, 0.5)             # partial volume
        img *= _bias_field(crng, shape)
        sigma = float(site_cfg["noise"])
        if sigma > 0:
            n1 = crng.normal(0.0, sigma, shape).astype(np.float32)
            n2 = crng.normal(0.0, sigma, shape).astype(np.float32)
            img = np.sqrt((img + n1) ** 2 + n2 ** 2)          # Rician magnitude
        images[contrast] = img.astype(np.float32)

    if site_cfg.get("skull_stripped"):  # delivered as BraTS is: zero outside the brain
        images = {c: np.where(label > 0, img, 0.0).astype(np.float32) for c, img in images.items()}
    for contrast, img in images.items():
        save_nifti(img, aff, out[contrast], dtype=np.float32)
        if contrast in site_cfg.get("own_grid", []):  # a separate sequence on a grid of its own
            own_grid_copy(out[contrast], out[contrast])
    if "label" in out:
        save_nifti(label, aff, out["label"], dtype=np.uint8)
    if "brain_mask" in out:
        save_nifti((label > 0).astype(np.uint8), aff, out["brain_mask"], dtype=np.uint8)
    return {
        "subject": subject,
        "affine": aff,
        "shape": shape,
        "voxel_mm": voxel_mm,
        "lesion_voxels": schema.lesion_counts(label),
        "attempts": attempt + 1,
    }


# ------------------------------------------------------------------ deliveries of real cohorts
def skull_stripped_copy(image_path, brain_mask_path, out_path):
    """The image multiplied by the brain mask, as BraTS and many derivatives deliver it."""
    import nibabel as nib

    img = nib.load(str(image_path))
    mask = np.asanyarray(nib.load(str(brain_mask_path)).dataobj) > 0
    return save_nifti(np.where(mask, img.get_fdata(dtype=np.float32), 0), img.affine, out_path, dtype=np.float32)


def own_grid_copy(image_path, out_path, voxel_mm=4.5, shape=(56, 60, 54), oblique_deg=(8.0, -5.0, 4.0),
                  motion_deg=(4.0, -3.0, 5.0), motion_mm=(5.0, -4.0, 3.0), order=3):
    """The image as a separate sequence delivers it: resampled onto a coarser oblique grid of
    its own (FLAIR and T2 at 4-5 mm beside a 1 mm T1) and moved by head motion between the
    sequences (a rigid motion of its content in world space), so that only registration, not
    the headers, puts it back onto the T1. Label maps pass ``order=0``. Returns the affine."""
    import nibabel as nib
    from nibabel.processing import resample_from_to
    from scipy.spatial.transform import Rotation

    img = nib.load(str(image_path))
    grid = np.eye(4)
    grid[:3, :3] = Rotation.from_euler("xyz", oblique_deg, degrees=True).as_matrix() * float(voxel_mm)
    centre = (img.affine @ np.r_[np.array(img.shape[:3]) / 2.0, 1.0])[:3]
    grid[:3, 3] = centre - grid[:3, :3] @ (np.array(shape) / 2.0)
    data = resample_from_to(img, (tuple(shape), grid), order=order).get_fdata()
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", motion_deg, degrees=True).as_matrix()
    motion[:3, 3] = centre - motion[:3, :3] @ centre + np.asarray(motion_mm, dtype=float)
    dtype = np.uint8 if order == 0 else np.float32
    data = np.rint(data) if order == 0 else np.clip(data, 0, None)
    save_nifti(data.astype(dtype), motion @ grid, out_path, dtype=dtype)
    return motion @ grid
