"""The 1 mm tissue atlas, the intensity model and the working-grid template.

Why: the workflow must run offline. nilearn ships the skull-stripped MNI152
2009 T1 with GM/WM/brain-mask probability maps; from them we derive a labelled
1 mm atlas (csf, gm, wm, deep_gm, brainstem) with synthetic head layers
(extra-cerebral CSF, skull, scalp) and a per-tissue intensity model. The same
atlas gives the registration template on the working grid (this module) and
the anatomy of the embedded demo cohort (:mod:`brainsynth.demo`), so the two
agree by construction.
"""

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import atomic_path, save_nifti
from .labels import LabelSchema

# Internal atlas label codes (equal to the default schema values).
ATLAS_CODES = {
    "background": 0, "csf": 1, "gm": 2, "wm": 3, "deep_gm": 4, "brainstem": 5,
    "wmh": 6, "necrotic": 7, "oedema": 8, "enhancing": 9,
}
# Fraction channels of the atlas, in this order.
BRAIN_TISSUES = ("csf", "gm", "wm", "deep_gm", "brainstem")
# Head layers outside the brain: codes of the internal head map (0 = neither).
HEAD_CODES = {"ext_csf": 1, "skull": 2, "scalp": 3}
HEAD_LAYERS = ("ext_csf", "skull", "scalp")
HEAD_THICKNESS_MM = {"ext_csf": 2.5, "skull": 6.0, "scalp": 6.0}
# Tissue classes -> the three Atropos prior classes.
PRIOR_CLASSES = {"csf": ("csf",), "gm": ("gm", "deep_gm"), "wm": ("wm", "brainstem")}
PRIOR_ORDER = ("csf", "gm", "wm")

# Mean intensity per tissue / head layer / lesion class and contrast (arbitrary
# units, WM on T1 ~0.85). t1ce is T1 after contrast: the enhancing rim lights up.
INTENSITY_MODEL = {
    "t1": {"background": 0.0, "csf": 0.22, "gm": 0.55, "wm": 0.85, "deep_gm": 0.66,
           "brainstem": 0.78, "ext_csf": 0.18, "skull": 0.07, "scalp": 0.92,
           "wmh": 0.62, "necrotic": 0.18, "oedema": 0.45, "enhancing": 0.58},
    "t1ce": {"background": 0.0, "csf": 0.22, "gm": 0.57, "wm": 0.85, "deep_gm": 0.67,
             "brainstem": 0.78, "ext_csf": 0.2, "skull": 0.07, "scalp": 0.92,
             "wmh": 0.62, "necrotic": 0.2, "oedema": 0.47, "enhancing": 1.05},
    "t2": {"background": 0.0, "csf": 1.0, "gm": 0.6, "wm": 0.4, "deep_gm": 0.5,
           "brainstem": 0.45, "ext_csf": 0.95, "skull": 0.05, "scalp": 0.55,
           "wmh": 0.8, "necrotic": 0.95, "oedema": 0.82, "enhancing": 0.62},
    "flair": {"background": 0.0, "csf": 0.1, "gm": 0.6, "wm": 0.45, "deep_gm": 0.55,
              "brainstem": 0.5, "ext_csf": 0.12, "skull": 0.05, "scalp": 0.7,
              "wmh": 0.95, "necrotic": 0.3, "oedema": 0.92, "enhancing": 0.75},
}

# Deep grey nuclei (right hemisphere; mirrored): centre and semi-axes in MNI mm.
_DEEP_GM_ELLIPSOIDS = [
    ((11.0, -18.0, 6.0), (8.0, 14.0, 9.0)),    # thalamus
    ((25.0, 2.0, 1.0), (6.0, 14.0, 10.0)),     # putamen
    ((19.0, -4.0, -1.0), (5.0, 7.0, 5.0)),     # globus pallidus
    ((13.0, 12.0, 9.0), (5.0, 9.0, 9.0)),      # caudate head
    ((16.0, -6.0, 19.0), (4.0, 12.0, 5.0)),    # caudate body
]
# Brainstem: elliptic cross-section (x, y semi-axes) whose centre y moves with z.
_BRAINSTEM_Z = (-80.0, -72.0, -55.0, -30.0, -12.0, -3.0)
_BRAINSTEM_Y = (-46.0, -45.0, -40.0, -26.0, -25.0, -24.0)
_BRAINSTEM_RX = (8.0, 8.0, 9.0, 13.0, 13.0, 12.0)
_BRAINSTEM_RY = (8.0, 8.0, 9.0, 12.0, 11.0, 10.0)

_DIST_MM = 2.0       # grid of the signed distance to the brain surface
_DIST_PAD_MM = 40.0  # room for the head layers around the 1 mm atlas


def intensity_model():
    """A fresh copy of :data:`INTENSITY_MODEL` (contrast -> class -> mean)."""
    return {c: dict(v) for c, v in INTENSITY_MODEL.items()}


@dataclass(frozen=True, eq=False)
class Atlas:
    """The 1 mm MNI atlas. Arrays are read-only (the object is cached)."""

    affine: np.ndarray          # 1 mm voxel -> MNI mm
    label: np.ndarray           # uint8, ATLAS_CODES (head layers are 0)
    fractions: np.ndarray       # uint8 (5, X, Y, Z): BRAIN_TISSUES fractions * 255
    sdist: np.ndarray           # float32 signed distance (mm) to the brain surface, +outside
    sdist_affine: np.ndarray    # voxel -> mm of ``sdist`` (2 mm grid)
    brain_lo: np.ndarray        # MNI mm bounding box of the brain (voxel centres)
    brain_hi: np.ndarray
    tumour_centres: np.ndarray  # (M, 3) mm: deep cerebral WM, |x| in [20, 40]
    wmh_centres: np.ndarray     # (K, 3) mm: periventricular WM

    @property
    def shape(self):
        return self.label.shape

    def head_map(self):
        """uint8 head-layer codes (HEAD_CODES) on the 1 mm grid."""
        return _head_map_1mm(self)


def _ro(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _ellipsoid(coords, centre, radii):
    x, y, z = coords
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) <= 1.0


def _box(affine, shape, lo_mm, hi_mm):
    """Voxel slices of a mm box (clipped) and the mm coordinates of its voxels."""
    lo = np.clip(np.floor(lo_mm - affine[:3, 3]).astype(int), 0, np.array(shape))
    hi = np.clip(np.ceil(hi_mm - affine[:3, 3]).astype(int) + 1, 0, np.array(shape))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    coords = np.ogrid[sl[0], sl[1], sl[2]]
    coords = [c + affine[i, 3] for i, c in enumerate(coords)]
    return sl, coords


_ATLAS_FIELDS = ("affine", "label", "fractions", "sdist", "sdist_affine", "brain_lo", "brain_hi",
                 "tumour_centres", "wmh_centres")


def save_atlas(path, atlas=None):
    """Write the atlas as an uncompressed ``.npz`` (about 55 MB): reading it takes 0.1 s where
    building it from nilearn's maps takes 3 s, once per demo subject."""
    atlas = load_atlas() if atlas is None else atlas
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: getattr(atlas, k) for k in _ATLAS_FIELDS})
    return path


@functools.lru_cache(maxsize=2)
def load_atlas(path=None):
    """The 1 mm atlas: read from ``path`` (a :func:`save_atlas` file) or built from nilearn's
    MNI152 2009 maps (cached in-process)."""
    if path is not None:
        with np.load(str(path)) as z:
            missing = [k for k in _ATLAS_FIELDS if k not in z.files]
            if missing:
                raise InputError(f"atlas file lacks {missing}", file=path, fix="delete it and rerun the workflow")
            return Atlas(**{k: _ro(z[k]) for k in _ATLAS_FIELDS})
    from nilearn import datasets

    imgs = {
        "mask": datasets.load_mni152_brain_mask(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }
    affine = np.asarray(imgs["mask"].affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("expected nilearn's 1 mm MNI152 templates on an axis-aligned grid")
    brain = np.asarray(imgs["mask"].dataobj) > 0.5
    gm = np.rint(np.asarray(imgs["gm"].dataobj, dtype=np.float32) * 255).astype(np.int16)
    wm = np.rint(np.asarray(imgs["wm"].dataobj, dtype=np.float32) * 255).astype(np.int16)
    gm[~brain] = 0
    wm[~brain] = 0
    csf = np.clip(255 - gm - wm, 0, 255).astype(np.int16)
    csf[~brain] = 0
    shape = brain.shape
    c = ATLAS_CODES

    # Tissue label: argmax of (csf, gm, wm) inside the brain.
    label = np.zeros(shape, np.uint8)
    label[brain] = c["csf"]
    label[brain & (gm > csf) & (gm >= wm)] = c["gm"]
    label[brain & (wm > csf) & (wm > gm)] = c["wm"]

    # Deep grey nuclei: grey or GM/WM-mix voxels inside the nuclei ellipsoids.
    sl, xyz = _box(affine, shape, np.array([-40.0, -40.0, -15.0]), np.array([40.0, 30.0, 35.0]))
    region = np.zeros(tuple(s.stop - s.start for s in sl), bool)
    for centre, radii in _DEEP_GM_ELLIPSOIDS:
        for sign in (1.0, -1.0):
            region |= _ellipsoid(xyz, (sign * centre[0],) + centre[1:], radii)
    sub = label[sl]
    deep = region & np.isin(sub, (c["gm"], c["wm"])) & (gm[sl] >= 0.2 * 255)
    sub[deep] = c["deep_gm"]

    # Brainstem: grey/white voxels in an elliptic column below the thalamus.
    sl, (x, y, z) = _box(affine, shape, np.array([-20.0, -60.0, -80.0]), np.array([20.0, -8.0, -3.0]))
    yc = np.interp(z, _BRAINSTEM_Z, _BRAINSTEM_Y)
    rx = np.interp(z, _BRAINSTEM_Z, _BRAINSTEM_RX)
    ry = np.interp(z, _BRAINSTEM_Z, _BRAINSTEM_RY)
    column = (x / rx) ** 2 + ((y - yc) / ry) ** 2 <= 1.0
    sub = label[sl]
    sub[column & np.isin(sub, (c["gm"], c["wm"]))] = c["brainstem"]

    # Fractions: deep_gm / brainstem voxels take their GM+WM share.
    frac = np.zeros((len(BRAIN_TISSUES),) + shape, np.uint8)
    frac[0] = csf
    mix = gm + wm
    for ch, code in ((3, c["deep_gm"]), (4, c["brainstem"])):
        sel = label == code
        frac[ch][sel] = mix[sel]
        gm[sel] = 0
        wm[sel] = 0
    frac[1] = gm
    frac[2] = wm
    del gm, wm, csf, mix

    idx = np.argwhere(brain)
    brain_lo = idx.min(0) + affine[:3, 3]
    brain_hi = idx.max(0) + affine[:3, 3]
    del idx

    sdist, sdist_affine = _signed_distance(brain, affine)
    tumour_centres = _tumour_centres(label, affine)
    wmh_centres = _wmh_centres(label, affine)
    return Atlas(
        affine=_ro(affine), label=_ro(label), fractions=_ro(frac), sdist=_ro(sdist),
        sdist_affine=_ro(sdist_affine), brain_lo=_ro(brain_lo), brain_hi=_ro(brain_hi),
        tumour_centres=_ro(tumour_centres), wmh_centres=_ro(wmh_centres),
    )


def _signed_distance(brain, affine):
    """Signed distance (mm, + outside) to the brain surface on a padded 2 mm grid."""
    f = int(_DIST_MM)
    pad = int(_DIST_PAD_MM)
    shape = np.array(brain.shape)
    big = np.zeros(tuple(((shape + 2 * pad + f - 1) // f) * f), np.float32)
    big[pad:pad + shape[0], pad:pad + shape[1], pad:pad + shape[2]] = brain
    s = big.shape
    coarse = big.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5)) >= 0.5
    coarse = ndimage.binary_closing(coarse, iterations=2, border_value=0)
    out = ndimage.distance_transform_edt(~coarse, sampling=_DIST_MM)
    inside = ndimage.distance_transform_edt(coarse, sampling=_DIST_MM)
    half = _DIST_MM / 2
    sd = np.where(coarse, -(inside - half), out - half).astype(np.float32)
    sd = ndimage.gaussian_filter(sd, 1.0).astype(np.float32)
    aff = np.eye(4)
    aff[:3, :3] *= _DIST_MM
    # centre of coarse voxel 0 = mean of fine voxels 0..f-1 of the padded grid
    aff[:3, 3] = affine[:3, 3] - pad + (f - 1) / 2.0
    return sd, aff


def _tumour_centres(label, affine):
    c = ATLAS_CODES
    sl, (x, _, _) = _box(affine, label.shape, np.array([-40.0, -60.0, 5.0]), np.array([40.0, 35.0, 45.0]))
    wm = label[sl] == c["wm"]
    depth = ndimage.distance_transform_edt(wm)
    ok = wm & (depth >= 3.0) & (np.abs(x) >= 20.0) & (np.abs(x) <= 40.0)
    idx = np.argwhere(ok)[::7]
    return (idx + np.array([s.start for s in sl]) + affine[:3, 3]).astype(np.float32)


def _wmh_centres(label, affine):
    """WM voxels 1-7 mm from the lateral ventricles (large CSF components near the midline)."""
    c = ATLAS_CODES
    sl, _ = _box(affine, label.shape, np.array([-35.0, -50.0, -5.0]), np.array([35.0, 35.0, 38.0]))
    sub = label[sl]
    csf = sub == c["csf"]
    comp, n = ndimage.label(csf)
    if n == 0:
        raise RuntimeError("no ventricles found in the MNI atlas")
    sizes = ndimage.sum(csf, comp, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 2000) + 1
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    vent = np.isin(comp, keep)
    d = ndimage.distance_transform_edt(~vent)
    ok = (sub == c["wm"]) & (d >= 1.0) & (d <= 7.0)
    idx = np.argwhere(ok)[::5]
    return (idx + np.array([s.start for s in sl]) + affine[:3, 3]).astype(np.float32)


# ---------------------------------------------------------------- sampling


def world_to_voxel(affine, pts):
    """(3, N) mm -> (3, N) voxel coordinates of ``affine``'s grid."""
    inv = np.linalg.inv(affine)
    return inv[:3, :3] @ pts + inv[:3, 3:4]


def sample_atlas(atlas, pts):
    """Atlas fields at (3, N) MNI mm points.

    Returns ``label`` (uint8, nearest), ``fractions`` (5, N) float32 in [0, 1]
    (linear; they sum to 1 inside the brain and fall to 0 outside) and
    ``sdist`` (N,) float32 signed distance to the brain surface in mm.
    """
    vox = world_to_voxel(atlas.affine, pts)
    label = ndimage.map_coordinates(atlas.label, vox, order=0, mode="constant", cval=0,
                                    output=np.uint8)
    frac = np.empty((len(BRAIN_TISSUES), pts.shape[1]), np.float32)
    for i in range(len(BRAIN_TISSUES)):
        ndimage.map_coordinates(atlas.fractions[i], vox, order=1, mode="constant", cval=0,
                                output=frac[i])
    frac *= 1.0 / 255.0
    dvox = world_to_voxel(atlas.sdist_affine, pts)
    sdist = ndimage.map_coordinates(atlas.sdist, dvox, order=1, mode="nearest", output=np.float32)
    return label, frac, sdist


def head_layer_codes(sdist, thickness=None):
    """HEAD_CODES of points at signed distance ``sdist`` (0 inside the brain or in air)."""
    t = dict(HEAD_THICKNESS_MM if thickness is None else thickness)
    edges = np.cumsum([t[k] for k in HEAD_LAYERS])
    codes = np.zeros(np.shape(sdist), np.uint8)
    out = sdist > 0
    layer = np.searchsorted(edges, sdist, side="left")  # 0,1,2 inside layers, 3 beyond
    for i, name in enumerate(HEAD_LAYERS):
        codes[out & (layer == i)] = HEAD_CODES[name]
    return codes


def model_intensity(frac, sdist, means, thickness=None):
    """Noise-free intensity from tissue fractions and the head layers.

    ``means`` maps class / layer names to mean intensity; brain fractions are
    mixed linearly and the remainder (1 - brain fraction) takes the intensity
    of the head layer at that distance (air beyond the scalp).
    """
    mu = np.array([means[k] for k in BRAIN_TISSUES], np.float32)
    img = np.tensordot(mu, frac, axes=1).astype(np.float32)
    head = head_layer_codes(np.maximum(sdist, 1e-3), thickness)
    lut = np.zeros(len(HEAD_LAYERS) + 1, np.float32)
    lut[0] = means.get("background", 0.0)
    for name in HEAD_LAYERS:
        lut[HEAD_CODES[name]] = means[name]
    rest = np.clip(1.0 - frac.sum(axis=0), 0.0, 1.0)
    img += rest * lut[head]
    return img


def as_schema(schema):
    """LabelSchema from None (default), a LabelSchema, a config or its ``labels`` section."""
    if schema is None:
        return LabelSchema()
    if isinstance(schema, LabelSchema):
        return schema
    if isinstance(schema, dict):
        return LabelSchema.from_config(schema if "labels" in schema else {"labels": schema})
    raise TypeError(f"expected a LabelSchema or a labels mapping, got {type(schema).__name__}")


def label_lut(schema):
    """uint8 LUT: internal atlas code -> schema value (missing classes fall back)."""
    fallback = {"deep_gm": "gm", "brainstem": "wm", "wmh": "wm", "necrotic": "wm",
                "oedema": "wm", "enhancing": "wm"}
    for need in ("csf", "gm", "wm"):
        if need not in schema.classes:
            raise InputError(f"the built-in atlas needs class {need!r}", field="labels.classes",
                             fix=f"declare '{need}' under labels.classes")
    lut = np.zeros(256, np.uint8)
    for name, code in ATLAS_CODES.items():
        target = name if name in schema.classes else fallback.get(name, "background")
        lut[code] = schema.value(target)
    return lut


@functools.lru_cache(maxsize=2)
def _head_map_1mm(atlas):
    idx = np.indices(atlas.shape, dtype=np.float32).reshape(3, -1)
    pts = idx + atlas.affine[:3, 3:4].astype(np.float32)
    dvox = world_to_voxel(atlas.sdist_affine, pts.astype(np.float64))
    sd = ndimage.map_coordinates(atlas.sdist, dvox, order=1, mode="nearest", output=np.float32)
    return _ro(head_layer_codes(sd).reshape(atlas.shape))


# ---------------------------------------------------------------- template


def working_grid_affine(grid_voxel_mm, grid_shape, atlas=None):
    """Axis-aligned (RAS) affine of the working grid, centred on the brain."""
    atlas = load_atlas() if atlas is None else atlas
    v = float(grid_voxel_mm)
    shape = np.asarray(grid_shape, dtype=float)
    centre = (atlas.brain_lo + atlas.brain_hi) / 2.0
    aff = np.eye(4)
    aff[:3, :3] *= v
    aff[:3, 3] = centre - v * (shape - 1) / 2.0
    return aff


def _grid_margins_mm(grid_voxel_mm, grid_shape, atlas):
    aff = working_grid_affine(grid_voxel_mm, grid_shape, atlas)
    lo = aff[:3, 3]
    hi = lo + float(grid_voxel_mm) * (np.asarray(grid_shape) - 1)
    return np.minimum(atlas.brain_lo - lo, hi - atlas.brain_hi)


def build_template(grid_voxel_mm, grid_shape, out, schema=None):
    """Write the working-grid template and return a summary.

    ``out`` maps names to paths: ``t1`` (float32 T1 head, noise free),
    ``brain_mask`` (uint8), ``label`` or ``labels`` (uint8 schema values),
    ``priors`` (float32 4D, last axis csf, gm, wm) and/or ``prior_csf``,
    ``prior_gm``, ``prior_wm`` (3D float32), optional ``head`` (uint8
    HEAD_CODES). ``schema``: LabelSchema, the config's ``labels`` mapping or
    None. Priors lie in [0, 1], sum to 1 inside the mask and 0 outside.
    The head layers are thinned when the scalp would not fit in the grid; the
    brain never is cropped (InputError when it does not fit).
    """
    schema = as_schema(schema)
    known = {"t1", "brain_mask", "label", "labels", "priors", "prior_csf", "prior_gm",
             "prior_wm", "head"}
    unknown = set(out) - known
    if unknown:
        raise ValueError(f"unknown template outputs {sorted(unknown)}; known: {sorted(known)}")
    shape = tuple(int(s) for s in grid_shape)
    v = float(grid_voxel_mm)
    if len(shape) != 3 or min(shape) < 1 or v <= 0:
        raise InputError(f"grid must be 3 positive sizes and a positive voxel size, got {shape} at {v} mm",
                         field="grid")
    atlas = load_atlas()
    margin = _grid_margins_mm(v, shape, atlas)
    if margin.min() < v:
        extent = atlas.brain_hi - atlas.brain_lo + 1
        need = np.ceil((extent + 2 * v) / v).astype(int) + 1
        raise InputError(
            f"the brain ({extent[0]:.0f}x{extent[1]:.0f}x{extent[2]:.0f} mm) does not fit in the "
            f"working grid {list(shape)} at {v:g} mm with a one-voxel margin",
            field="grid.shape", fix=f"use at least {need.tolist()} voxels at {v:g} mm")
    # Head layers: leave one voxel of air around the scalp, thin them if needed.
    total = sum(HEAD_THICKNESS_MM.values())
    room = float(margin.min()) - v
    head_scale = float(np.clip(room / total, 0.0, 1.0))
    thickness = {k: t * head_scale for k, t in HEAD_THICKNESS_MM.items()}

    aff = working_grid_affine(v, shape, atlas)
    ss = max(1, int(round(v / 2.0)))  # sub-samples per axis (anti-aliasing)
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    sub = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), 0).reshape(3, -1)  # voxel units
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    nvox = idx.shape[1]
    t1 = np.zeros(nvox, np.float32)
    fr_acc = np.zeros((len(BRAIN_TISSUES), nvox), np.float32)
    votes = np.zeros((len(ATLAS_CODES), nvox), np.uint8)
    head_votes = np.zeros((len(HEAD_CODES) + 1, nvox), np.uint8)
    means = INTENSITY_MODEL["t1"]
    for k in range(sub.shape[1]):
        pts = aff[:3, :3] @ (idx + sub[:, k:k + 1]) + aff[:3, 3:4]
        lab, frac, sd = sample_atlas(atlas, pts)
        t1 += model_intensity(frac, sd, means, thickness)
        fr_acc += frac
        for code in np.unique(lab):
            votes[code] += lab == code
        hc = head_layer_codes(sd, thickness)
        for code in range(head_votes.shape[0]):
            head_votes[code] += hc == code
    n = sub.shape[1]
    t1 /= n
    fr_acc /= n
    # majority label; ties and near-ties favour the brain
    internal = np.argmax(votes, axis=0).astype(np.uint8)
    label = label_lut(schema)[internal].reshape(shape)
    mask = label > 0
    t1 = t1.reshape(shape)
    sigma = 0.5 if ss == 1 else 0.35
    t1 = ndimage.gaussian_filter(t1, sigma).astype(np.float32)

    priors = np.zeros((len(PRIOR_ORDER),) + shape, np.float32)
    for i, name in enumerate(PRIOR_ORDER):
        for tissue in PRIOR_CLASSES[name]:
            priors[i] += fr_acc[BRAIN_TISSUES.index(tissue)].reshape(shape)
    priors *= mask
    s = priors.sum(axis=0)
    ok = mask & (s > 1e-3)
    priors[:, ok] /= s[ok]
    empty = mask & ~ok  # brain by vote, no tissue fraction: one-hot of the voted tissue
    if empty.any():
        tissue_of = {ATLAS_CODES[t]: PRIOR_ORDER.index(p) for p, ts in PRIOR_CLASSES.items() for t in ts}
        iv = internal.reshape(shape)[empty]
        ch = np.array([tissue_of.get(int(x), PRIOR_ORDER.index("wm")) for x in iv])
        priors[:, empty] = 0.0
        priors[(ch,) + np.nonzero(empty)] = 1.0
    priors = np.clip(priors, 0.0, 1.0)

    if "t1" in out:
        save_nifti(t1, aff, out["t1"], dtype=np.float32)
    if "brain_mask" in out:
        save_nifti(mask.astype(np.uint8), aff, out["brain_mask"], dtype=np.uint8)
    for key in ("label", "labels"):
        if key in out:
            save_nifti(label, aff, out[key], dtype=np.uint8)
    if "priors" in out:
        save_nifti(np.moveaxis(priors, 0, -1), aff, out["priors"], dtype=np.float32)
    for i, name in enumerate(PRIOR_ORDER):
        if f"prior_{name}" in out:
            save_nifti(priors[i], aff, out[f"prior_{name}"], dtype=np.float32)
    if "head" in out:
        head = np.argmax(head_votes, axis=0).astype(np.uint8).reshape(shape)
        head[mask] = 0
        save_nifti(head, aff, out["head"], dtype=np.uint8)
    return {
        "affine": aff,
        "shape": shape,
        "voxel_mm": v,
        "head_scale": head_scale,
        "head_thickness_mm": thickness,
        "brain_margin_mm": margin.tolist(),
        "prior_order": list(PRIOR_ORDER),
    }
