"""Per-subject preprocessing with ANTs: N4, registration, skull stripping, working grid.

The study's generators and nnU-Net all see subjects registered to one template,
skull-stripped, on one working grid, with intensities on a common scale and
tissue maps that are probabilistic (channels summing to 1). Each step here is a
function of files to files (unit-tested alone); :func:`preprocess_subject` chains
them into one subject folder for the workflow's one-job-per-subject rule.
"""

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import atomic_path, save_json, save_nifti
from .labels import LabelSchema
from .sheet import anchor_modality

log = logging.getLogger(__name__)

_AFFINE_SHRINK = (6, 4, 2, 1)
_AFFINE_SMOOTH = (3, 2, 1, 0)
_REG_TMP_PREFIX = ".reg_tmp_"
# ANTs transforms without a deformation field (config registration.transform's linear values)
LINEAR_TRANSFORMS = ("Translation", "Rigid", "Similarity", "Affine")
# ANTs reads and writes a deformation field as a transform file, not an image, when its path
# holds one of these anywhere (itkantsReadWriteTransform.h), and then fails or drops the field
_ANTS_TRANSFORM_MARKS = (".h5", ".hdf5", ".hdf4", ".mat", ".txt", ".xfm")


def _check_field_path(path):
    hit = [m for m in _ANTS_TRANSFORM_MARKS if m in str(path)]
    if hit:
        raise InputError(f"ANTs would read and write this deformation field as a transform file: its path "
                         f"contains {hit[0]!r}", file=path,
                         fix="rename the folders (subject id, experiment, results path) so that no part of the "
                             "path contains .h5, .hdf, .mat, .txt or .xfm")


def set_threads(n):
    """ANTs/ITK read their thread count from the environment at each call."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(n)))


def _ants_seed(seed):
    """antsRegistration reads --random-seed 0 as "seed from the clock": 0 is sent as 1."""
    seed = int(seed)
    return seed if seed > 0 else 1 - seed


def _ants():
    import ants

    return ants


def _save_ants(image, path):
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))
    return Path(path)


def n4_correct(in_path, out_path, shrink_factor=4, iterations=(50, 50, 30), tol=1e-7):
    """N4 bias-field correction of one image, fitted inside a head mask.

    The mask (ANTs' intensity-threshold ``get_mask``) keeps the fit off the noisy
    background, which otherwise dominates both the runtime and the field.
    """
    ants = _ants()
    img = ants.image_read(str(in_path))
    corrected = ants.n4_bias_field_correction(
        img,
        mask=ants.get_mask(img),
        shrink_factor=int(shrink_factor),
        convergence={"iters": list(iterations), "tol": tol},
    )
    return _save_ants(corrected, out_path)


def _registration_inputs(fixed_path, moving_path, levels, what, out_file):
    """The image pair of a registration, after checking its number of levels (the shrink and
    smoothing schedules have four) and removing scratch folders a killed registration left
    beside ``out_file``. Returns (fixed, moving, output folder)."""
    if not 1 <= levels <= 4:
        raise ValueError(f"{what} must have 1 to 4 levels")
    ants = _ants()
    out_dir = Path(out_file).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{_REG_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)), out_dir


def register(moving_path, fixed_path, out_affine, out_warp, out_inverse_warp, out_warped,
             transform="SyN", syn_iterations=(40, 20, 0), affine_iterations=(200, 100, 50, 0),
             seed=0):
    """Register a subject's T1 to the template T1 and keep the transforms.

    Writes the affine (.mat), the forward and inverse SyN warps and the warped
    T1. For a linear ``transform`` (Rigid/Affine) the warp files hold identity
    fields so downstream rules see the same file set whatever the transform; a deformable
    one whose field ANTs does not return is an error, never an identity field.
    """
    for p in (out_warp, out_inverse_warp):
        _check_field_path(p)
    ants = _ants()
    n_aff = len(affine_iterations)
    fixed, moving, out_dir = _registration_inputs(fixed_path, moving_path, n_aff, "affine_iterations", out_affine)
    with tempfile.TemporaryDirectory(prefix=_REG_TMP_PREFIX, dir=out_dir) as tmp:
        _check_field_path(Path(tmp) / "reg_1Warp.nii.gz")
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=transform,
            outprefix=str(Path(tmp) / "reg_"),
            reg_iterations=tuple(int(i) for i in syn_iterations),
            aff_iterations=tuple(int(i) for i in affine_iterations),
            aff_shrink_factors=_AFFINE_SHRINK[-n_aff:],
            aff_smoothing_sigmas=_AFFINE_SMOOTH[-n_aff:],
            random_seed=_ants_seed(seed),
        )
        fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
        affine = [t for t in fwd if t.endswith(".mat")]
        warps = [t for t in fwd if t.endswith(".nii.gz")]
        inv_warps = [t for t in inv if t.endswith(".nii.gz")]
        if len(affine) != 1:
            raise RuntimeError(f"ANTs returned unexpected transforms: {fwd}")
        if transform not in LINEAR_TRANSFORMS and not (warps and inv_warps):
            # identity fields here would pass silently as a registration without its SyN stage
            # (a 2026-12-04 demo run lost one subject's warp this way: skull strip 3.5% off)
            raise RuntimeError(f"ANTs {transform} registration of {moving_path} returned no deformation field "
                               f"(transforms: {fwd} / {inv}); rerun the subject")
        with atomic_path(out_affine) as tmp_aff:
            shutil.copyfile(affine[0], tmp_aff)
        if warps:
            with atomic_path(out_warp) as t:
                shutil.copyfile(warps[0], t)
            with atomic_path(out_inverse_warp) as t:
                shutil.copyfile(inv_warps[0], t)
        else:
            _identity_warp(fixed, out_warp)
            _identity_warp(moving, out_inverse_warp)
        _save_ants(reg["warpedmovout"], out_warped)
    return {"affine": Path(out_affine), "warp": Path(out_warp), "inverse_warp": Path(out_inverse_warp)}


def _identity_warp(reference, path):
    ants = _ants()
    shape = tuple(reference.shape) + (3,)
    field = ants.from_numpy(
        np.zeros(shape, dtype=np.float32),
        origin=reference.origin,
        spacing=reference.spacing,
        direction=reference.direction,
        has_components=True,
    )
    _save_ants(field, path)


def forward_transforms(affine, warp):
    """Transform list taking the subject (moving) image into template space."""
    return [str(warp), str(affine)], [False, False]


def inverse_transforms(affine, inverse_warp):
    """Transform list taking a template image back into the subject's space."""
    return [str(affine), str(inverse_warp)], [True, False]


def same_grid(a_path, b_path):
    """True when two images share shape and affine (header only, within the input check's
    tolerance, :data:`brainsynth.validate.AFFINE_ATOL_MM`): nothing to co-register."""
    from .validate import AFFINE_ATOL_MM

    a, b = nib.load(str(a_path)), nib.load(str(b_path))
    return (tuple(a.shape[:3]) == tuple(b.shape[:3])
            and float(np.max(np.abs(a.affine - b.affine))) <= AFFINE_ATOL_MM)


def _write_identity(path):
    ants = _ants()
    with atomic_path(path) as tmp:
        ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(tmp))


def head_mask(data, fraction=0.1):
    """Head outline of one image: voxels above ``fraction`` of its 99th percentile, largest
    component, holes filled. The outline (scalp) shows in every contrast, where ANTs'
    mean-threshold ``get_mask`` follows contrast (a perfectly aligned T2 scored 0.94 against
    its T1 with it, 0.985 with this one; a FLAIR moved by 5-7 mm and 3-5 degrees 0.93)."""
    data = np.asarray(data, dtype=np.float32)
    return refine_mask(data > fraction * np.percentile(data, 99), closing_voxels=0)


def coregistration_qc(fixed, moving):
    """Agreement of a modality with the T1 on the T1 grid: Dice of their head masks
    (:func:`head_mask`) and ANTs' Mattes mutual information (more negative is better)."""
    ants = _ants()
    return {"mask_dice": round(dice(head_mask(fixed.numpy()), head_mask(moving.numpy())), 4),
            "mutual_information": round(float(ants.image_mutual_information(fixed, moving)), 4)}


def coregister(moving_path, fixed_path, out_transform, iterations=(200, 100, 50), seed=0):
    """Rigid (6 dof) registration of one modality to the subject's T1 by Mattes mutual
    information, from a centre-of-mass start (ANTs' default for linear transforms).

    Sequences of one session differ by head motion and are often on their own grids
    (a 4.5 mm FLAIR beside a 1 mm T1); the transform is kept and composed with the
    template transform later, so each image is resampled once. Returns QC before
    (header geometry alone) and after registration.
    """
    ants = _ants()
    n = len(iterations)
    fixed, moving, out_dir = _registration_inputs(fixed_path, moving_path, n, "coregistration iterations",
                                                  out_transform)
    before = coregistration_qc(fixed, ants.resample_image_to_target(moving, fixed, interp_type="linear"))
    with tempfile.TemporaryDirectory(prefix=_REG_TMP_PREFIX, dir=out_dir) as tmp:
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid", aff_metric="mattes",
                                outprefix=str(Path(tmp) / "coreg_"),
                                aff_iterations=tuple(int(i) for i in iterations),
                                aff_shrink_factors=_AFFINE_SHRINK[-n:], aff_smoothing_sigmas=_AFFINE_SMOOTH[-n:],
                                random_seed=_ants_seed(seed))
        mats = [t for t in reg["fwdtransforms"] if t.endswith(".mat")]
        if len(mats) != 1:
            raise RuntimeError(f"ANTs returned unexpected transforms: {reg['fwdtransforms']}")
        with atomic_path(out_transform) as t:
            shutil.copyfile(mats[0], t)
        after = coregistration_qc(fixed, reg["warpedmovout"])
    return {"before": before, "after": after}


#: Rule for data delivered skull-stripped (BraTS, many derivatives): the T1 is zero outside
#: one connected component (26-neighbourhood, holding >= PRE_STRIPPED_COMPONENT of the
#: non-zero voxels), at least PRE_STRIPPED_ZERO_FRACTION of the field of view is exactly zero,
#: and the non-zero support is no larger than a brain (a head with a zeroed background is
#: larger: 3.5-5 L in the demo and in adults).
PRE_STRIPPED_ZERO_FRACTION = 0.3
PRE_STRIPPED_COMPONENT = 0.99


def detect_skull_stripped(t1_path, max_volume_ml=3000.0):
    """(is_stripped, evidence) for one T1 by the rule above (see ``PRE_STRIPPED_*``)."""
    img = nib.load(str(t1_path))
    data = np.asanyarray(img.dataobj)
    support = data != 0
    n = int(support.sum())
    vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    evidence = {"zero_fraction": round(1.0 - n / support.size, 4), "support_ml": round(n * vox_ml, 1),
                "largest_component": 0.0}
    if n == 0 or evidence["zero_fraction"] < PRE_STRIPPED_ZERO_FRACTION or evidence["support_ml"] > max_volume_ml:
        return False, evidence
    lab, k = ndimage.label(support, structure=ndimage.generate_binary_structure(3, 3))
    largest = int(np.bincount(lab.ravel())[1:].max()) if k else 0
    evidence["largest_component"] = round(largest / n, 4)
    return evidence["largest_component"] >= PRE_STRIPPED_COMPONENT, evidence


def mask_from_support(native_t1_path, out_mask, closing_voxels=1):
    """Brain mask of a pre-stripped image: its non-zero support (largest component, closed,
    hole-filled). Propagating a template mask would erode a brain someone already cut out."""
    img = nib.load(str(native_t1_path))
    mask = refine_mask(np.asanyarray(img.dataobj) != 0, int(closing_voxels))
    save_nifti(mask.astype(np.uint8), img.affine, out_mask)
    return mask


def brain_template(template_t1, template_mask, out_path):
    """The template T1 with everything outside its brain mask set to 0: the fixed image for
    registering pre-stripped subjects (a head template would pull the brain onto the skull)."""
    t1 = nib.load(str(template_t1))
    mask = np.asanyarray(nib.load(str(template_mask)).dataobj) > 0
    return save_nifti(np.where(mask, np.asanyarray(t1.dataobj), 0).astype(np.float32), t1.affine, out_path,
                      dtype=np.float32)


def resample_to_t1(path, t1_path, transform, out_path, interpolator="genericLabel"):
    """A label map or mask drawn on another modality's grid, brought to the native T1 grid."""
    ants = _ants()
    fixed = ants.image_read(str(t1_path))
    moving = ants.image_read(str(path))
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(transform)],
                                whichtoinvert=[False], interpolator=interpolator)
    return _save_ants(out, out_path)


def skull_strip(native_t1_path, template_mask_path, affine, inverse_warp, out_mask,
                threshold=0.5, closing_voxels=1):
    """Brain mask by propagating the template mask into the subject's space.

    The warped (linearly interpolated) mask is thresholded, then refined: the
    largest connected component is kept, holes are filled and an optional
    binary closing smooths the boundary.
    """
    ants = _ants()
    native = ants.image_read(str(native_t1_path))
    tmask = ants.image_read(str(template_mask_path))
    tlist, invert = inverse_transforms(affine, inverse_warp)
    warped = ants.apply_transforms(fixed=native, moving=tmask, transformlist=tlist,
                                   whichtoinvert=invert, interpolator="linear")
    prob = warped.numpy()
    mask = refine_mask(prob >= float(threshold), int(closing_voxels))
    ref = nib.load(str(native_t1_path))
    save_nifti(mask.astype(np.uint8), ref.affine, out_mask)
    return mask


def refine_mask(mask, closing_voxels=1):
    """Largest component, closed and hole-filled."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (int(np.argmax(sizes)) + 1)
    if closing_voxels > 0:
        struct = ndimage.generate_binary_structure(3, 1)
        mask = ndimage.binary_closing(mask, structure=struct, iterations=closing_voxels,
                                      border_value=0)
    return ndimage.binary_fill_holes(mask)


def dice(a, b):
    """Dice of two boolean masks; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def skull_strip_qc(mask_path, truth_path, out_json, subject, method="template mask propagation",
                   detection=None):
    """QC record for the mask: how it was made, its volume and, when a reference mask exists, Dice."""
    mask_img = nib.load(str(mask_path))
    mask = np.asanyarray(mask_img.dataobj) > 0
    vox_ml = float(np.prod(mask_img.header.get_zooms()[:3])) / 1000.0
    rec = {"subject": subject, "skull_strip_method": method,
           "brain_volume_ml": round(float(mask.sum()) * vox_ml, 2), "skull_strip_dice": None}
    if detection is not None:
        rec.update({f"pre_stripped_{k}": v for k, v in detection.items()})
    if truth_path:
        truth = np.asanyarray(nib.load(str(truth_path)).dataobj) > 0
        rec["skull_strip_dice"] = round(dice(mask, truth), 4)
    save_json(rec, out_json)
    return rec


def normalise_intensity(data, mask, lower=1.0, upper=99.0):
    """Percentile scaling inside the brain to [0, 1]; 0 outside the brain."""
    data = np.asarray(data, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(data)
    lo, hi = np.percentile(data[mask], [lower, upper])
    scale = hi - lo if hi > lo else 1.0
    out = np.clip((data - lo) / scale, 0.0, 1.0)
    out[~mask] = 0.0
    return out.astype(np.float32)


def probabilistic_from_labels(label, schema, voxel_mm, sigma_mm=2.0):
    """One-hot -> probabilistic maps (channels last, summing to 1).

    Each class channel is Gaussian-smoothed (``sigma_mm``), then the channels are
    renormalised; voxels whose smoothed mass vanishes keep their one-hot value.
    """
    onehot = schema.one_hot(label)
    if sigma_mm and sigma_mm > 0:
        sig = float(sigma_mm) / np.asarray(voxel_mm, dtype=float)
        onehot = np.stack([ndimage.gaussian_filter(c, sigma=sig, mode="constant") for c in onehot])
    total = onehot.sum(axis=0, keepdims=True)
    safe = total > 1e-6
    prob = np.where(safe, onehot / np.where(safe, total, 1.0), schema.one_hot(label))
    return np.moveaxis(prob.astype(np.float32), 0, -1)


@contextlib.contextmanager
def _own_temporaries():
    """Point ``tempfile``'s default folder at a private folder removed on exit: antspy's
    Atropos writes its prior and posterior probability images under ``tempfile.mktemp`` names
    and never deletes them (23 files per test run, one set per subject, left in $TMPDIR)."""
    before = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=".atropos-") as folder:
        tempfile.tempdir = folder
        try:
            yield
        finally:
            tempfile.tempdir = before


def probabilistic_from_atropos(t1_path, mask, prior_maps, schema, iterations=5, prior_weight=0.25):
    """Tissue maps by Atropos with template priors, for subjects without labels.

    ``prior_maps`` is a dict tissue-name -> 3D array on the same grid as the
    image. Lesion channels stay 0: Atropos has no lesion model.
    """
    ants = _ants()
    img = ants.image_read(str(t1_path))
    mask_img = img.new_image_like(np.asarray(mask, dtype=np.float32))
    names = list(prior_maps)
    priors = [img.new_image_like(np.asarray(prior_maps[n], dtype=np.float32)) for n in names]
    with _own_temporaries():
        seg = ants.atropos(a=img, x=mask_img, i=priors, m="[0.2,1x1x1]",
                           c=f"[{int(iterations)},0]", priorweight=float(prior_weight))
        probs = np.stack([p.numpy() for p in seg["probabilityimages"]])
    out = np.zeros((schema.n_classes,) + tuple(img.shape), dtype=np.float32)
    inside = np.asarray(mask, dtype=bool)
    probs = probs * inside
    s = probs.sum(axis=0)
    norm = np.where(s > 0, s, 1.0)
    for name, p in zip(names, probs):
        out[schema.value(name)] = np.where(inside, p / norm, 0.0)
    out[0] = np.where(inside & (s > 0), 0.0, 1.0)
    return np.moveaxis(out, 0, -1)


def to_working_grid(images, native_mask, affine, warp, template_t1, out_images, out_mask,
                    label=None, out_label=None, label_map=None, schema=None, lower=1.0, upper=99.0,
                    coregistration=None, label_coregistration=None):
    """Warp images, brain mask and (optionally) labels onto the template grid.

    ``images``/``out_images`` are dicts modality -> path. Images are masked and
    normalised; labels use ANTs' genericLabel interpolation (which keeps the
    source values), then ``label_map`` translates them to the schema. A modality
    co-registered to the T1 (``coregistration``: modality -> rigid ``.mat``) and a
    label map drawn on such a modality (``label_coregistration``) go through that
    transform and the template transform in one resampling. Returns the
    working-grid brain mask and label arrays.
    """
    ants = _ants()
    fixed = ants.image_read(str(template_t1))
    tlist, invert = forward_transforms(affine, warp)
    ref = nib.load(str(template_t1))

    coregistration = coregistration or {}

    def warp_to_grid(path, interpolator, coreg=None):
        moving = ants.image_read(str(path))
        extra = [str(coreg)] if coreg else []
        return ants.apply_transforms(fixed=fixed, moving=moving, transformlist=tlist + extra,
                                     whichtoinvert=invert + [False] * len(extra),
                                     interpolator=interpolator).numpy()

    mask = warp_to_grid(native_mask, "linear") >= 0.5
    save_nifti(mask.astype(np.uint8), ref.affine, out_mask)
    for mod, path in images.items():
        data = warp_to_grid(path, "linear", coregistration.get(mod))
        save_nifti(normalise_intensity(data, mask, lower, upper), ref.affine, out_images[mod],
                   dtype=np.float32)
    lab = None
    if label is not None:
        lab = np.rint(warp_to_grid(label, "genericLabel", label_coregistration)).astype(np.int32)
        if label_map:
            from .validate import apply_label_map

            lab = apply_label_map(lab, label_map, schema)
        lab = lab.astype(np.uint8)
        lab[~mask & (lab > 0)] = 0
        save_nifti(lab, ref.affine, out_label)
    return mask, lab


def lesion_record(label_path, schema, subject, has_label=True):
    """Lesion voxel counts per lesion type (numerators of dc_jl).

    ``has_label`` is False for subjects whose label map came from Atropos: their
    lesion counts are unknown, not zero, and they are left out of dc_jl maxima.
    """
    lab = np.asanyarray(nib.load(str(label_path)).dataobj)
    counts = schema.lesion_counts(lab)
    return {"subject": subject, **{f"n_{k}": v for k, v in counts.items()}, "has_label": bool(has_label)}


def lesion_proportions(records, schema):
    """dc_jl = lesion voxel count / the cohort's maximum for that lesion type."""
    import pandas as pd

    df = pd.DataFrame.from_records(records).sort_values("subject").reset_index(drop=True)
    labelled = df["has_label"].astype(bool)
    for lt in schema.lesion_types:
        col = df[f"n_{lt}"].astype(float)
        mx = col[labelled].max() if labelled.any() else 0.0
        dc = (col / mx).round(6) if mx > 0 else col * 0.0
        df[f"dc_{lt}"] = dc.where(labelled)
    return df


def tissue_priors_from_template(template_label_path, schema, sigma_mm=2.0):
    """Template tissue labels -> smoothed prior maps for Atropos (dict name -> array)."""
    img = nib.load(str(template_label_path))
    lab = np.asanyarray(img.dataobj).astype(np.int16)
    prob = probabilistic_from_labels(lab, schema, img.header.get_zooms()[:3], sigma_mm)
    return {t: prob[..., schema.value(t)] for t in schema.tissues}


def load_schema(config):
    return LabelSchema.from_config(config)


# ------------------------------------------------------------------ one subject, one job
#: Files of one preprocessed subject folder, relative to it ({m}: each modality). "t1" in a
#: name stands for the subject's anchor modality (:func:`brainsynth.sheet.anchor_modality`): its
#: T1, or its first modality in a dataset without T1.
SUBJECT_LAYOUT = {
    "n4": "n4/{m}.nii.gz",
    "coregistration": "coregistration/{m}_to_t1.mat",
    "coregistration_qc": "coregistration/qc.json",
    "affine": "registration/0GenericAffine.mat",
    "warp": "registration/1Warp.nii.gz",
    "inverse_warp": "registration/1InverseWarp.nii.gz",
    "warped": "registration/t1_in_template.nii.gz",
    "native_mask": "skull_strip/brain_mask.nii.gz",
    "skull_strip_qc": "skull_strip/qc.json",
    "image": "grid/{m}.nii.gz",
    "brain_mask": "grid/brain_mask.nii.gz",
    "label": "grid/label.nii.gz",
    "tissue_prob": "grid/tissue_prob.nii.gz",
    "lesions": "grid/lesions.json",
    "montage": "qc.png",
}


def subject_file(folder, kind, modality=None):
    """Path of one file of a preprocessed subject folder (``kind`` from :data:`SUBJECT_LAYOUT`)."""
    return Path(folder) / SUBJECT_LAYOUT[kind].format(m=modality)


#: Per-modality files the anchor itself has none of (it is the reference of co-registration).
NOT_FOR_ANCHOR = {"coregistration"}


def subject_files(folder, modalities):
    """Every file a complete preprocessed subject folder holds (``modalities``: the subject's)."""
    per_mod = [k for k, v in SUBJECT_LAYOUT.items() if "{m}" in v]
    anchor = anchor_modality(modalities)
    return ([subject_file(folder, k, m) for k in per_mod for m in modalities
             if not (m == anchor and k in NOT_FOR_ANCHOR)]
            + [subject_file(folder, k) for k, v in SUBJECT_LAYOUT.items() if "{m}" not in v])


def preprocess_subject(subject, images, out_dir, template, cfg, schema, label=None, truth_mask=None,
                       label_map=None, seed=0, pre_stripped=False, label_space=None):
    """N4 -> co-registration to the T1 -> registration to the template -> skull stripping ->
    working grid -> QC montage, for one subject, into the folder ``out_dir`` (see
    :data:`SUBJECT_LAYOUT`).

    One job per subject rather than one per step: at cohort scale (10,000 subjects)
    Snakemake's own cost per job and per declared file dominates planning, so the
    chain runs as one job with one folder output. The folder appears only when every
    step has finished (:func:`brainsynth.io.atomic_dir`).

    ``images``: modality -> native path; the anchor (``t1``, or the first modality of a subject
    without one, :func:`brainsynth.sheet.anchor_modality`) defines the native grid, the others
    may lie on their own grids; ``template``: dict with ``t1``, ``brain_mask`` and ``labels`` paths; ``cfg``:
    the ``preprocessing`` config section (n4, coregistration, registration, skull_strip,
    normalisation, tissue_maps). ``pre_stripped``: the subject's site is listed as
    delivered skull-stripped (otherwise :func:`detect_skull_stripped` decides when
    ``skull_strip.detect_pre_stripped`` is on). ``label_space``: the modality whose grid
    ``label`` and ``truth_mask`` were drawn on (None: the anchor). Returns the skull-strip QC record.
    """
    import time

    from .io import atomic_dir
    from .qc import subject_montage

    mods = list(images)
    anchor = anchor_modality(mods)
    label_space = label_space or anchor
    seconds, t0 = {}, time.monotonic()

    def lap(step):
        nonlocal t0
        now = time.monotonic()
        seconds[step] = now - t0
        t0 = now

    with atomic_dir(out_dir) as tmp:
        def f(kind, m=None):
            return subject_file(tmp, kind, m)

        n4 = cfg["n4"]
        for m, src in images.items():
            log.info("[%s] N4 %s", subject, m)
            n4_correct(src, f("n4", m), shrink_factor=n4["shrink_factor"], iterations=n4["iterations"])
        lap("N4")
        coreg = _coregister_modalities(subject, images, anchor, f, cfg.get("coregistration") or {}, seed)
        lap("co-registration")
        ss = cfg["skull_strip"]
        stripped, evidence = bool(pre_stripped), None
        if not stripped and ss.get("detect_pre_stripped", True):
            stripped, evidence = detect_skull_stripped(images[anchor], ss.get("max_pre_stripped_ml", 3000.0))
        reg = cfg["registration"]
        log.info("[%s] registration of the %s to the %s template (%s)", subject, anchor,
                 "brain" if stripped else "head", reg["transform"])
        fixed = template["t1"]
        if stripped:
            fixed = brain_template(template["t1"], template["brain_mask"], Path(tmp) / "registration" / ".brain.nii.gz")
        register(f("n4", anchor), fixed, f("affine"), f("warp"), f("inverse_warp"), f("warped"),
                 transform=reg["transform"], syn_iterations=reg["syn_iterations"],
                 affine_iterations=reg["affine_iterations"], seed=seed)
        if stripped:
            Path(fixed).unlink()
        lap("registration")
        if stripped:
            log.info("[%s] delivered skull-stripped (%s): brain mask = non-zero support", subject,
                     "site listed" if pre_stripped else f"detected, {evidence}")
            mask_from_support(images[anchor], f("native_mask"), closing_voxels=ss["closing_voxels"])
        else:
            log.info("[%s] skull stripping", subject)
            skull_strip(f("n4", anchor), template["brain_mask"], f("affine"), f("inverse_warp"), f("native_mask"),
                        threshold=ss["threshold"], closing_voxels=ss["closing_voxels"])
        label_coreg = coreg.get(label_space)
        truth = truth_mask
        if truth_mask and label_coreg:
            truth = resample_to_t1(truth_mask, images[anchor], label_coreg, Path(tmp) / "skull_strip" / ".truth.nii.gz")
        qc = skull_strip_qc(f("native_mask"), truth, f("skull_strip_qc"), subject,
                            method=("pre-stripped, site listed" if pre_stripped else
                                    "pre-stripped, detected" if stripped else "template mask propagation"),
                            detection=evidence)
        if truth is not truth_mask:
            Path(truth).unlink()
        log.info("[%s] skull strip QC: %s", subject, qc)
        lap("skull strip")
        log.info("[%s] working grid", subject)
        norm, tcfg = cfg["normalisation"], cfg["tissue_maps"]
        mask, lab = to_working_grid(
            {m: f("n4", m) for m in mods}, f("native_mask"), f("affine"), f("warp"), template["t1"],
            {m: f("image", m) for m in mods}, f("brain_mask"), label=label, out_label=f("label"),
            label_map=label_map, schema=schema, lower=norm["lower_percentile"], upper=norm["upper_percentile"],
            coregistration=coreg, label_coregistration=label_coreg,
        )
        ref = nib.load(str(template["t1"]))

        def atropos():
            priors = tissue_priors_from_template(template["labels"], schema, tcfg["smoothing_mm"])
            return probabilistic_from_atropos(f("image", anchor), mask, priors, schema,
                                              iterations=tcfg["atropos_iterations"])

        tissue_values = [schema.value(t) for t in schema.tissues]
        if label is not None and not np.isin(lab, tissue_values).any():
            log.info("[%s] label map holds lesions only (e.g. BraTS): tissue from Atropos, lesions kept", subject)
            lab = np.where(lab > 0, lab, np.argmax(atropos(), axis=-1)).astype(np.uint8)
            save_nifti(lab, ref.affine, f("label"))
        if label is not None:
            prob = probabilistic_from_labels(lab, schema, ref.header.get_zooms()[:3], tcfg["smoothing_mm"])
        else:
            log.info("[%s] no label map: tissue maps from Atropos with template priors", subject)
            prob = atropos()
            save_nifti(np.argmax(prob, axis=-1).astype(np.uint8), ref.affine, f("label"))
        save_nifti(prob, ref.affine, f("tissue_prob"), dtype=np.float32)
        save_json(lesion_record(f("label"), schema, subject, label is not None), f("lesions"))
        lap("working grid")
        subject_montage(f("montage"), subject, f("n4", anchor), f("native_mask"),
                        {m: f("image", m) for m in mods}, f("label"), n_classes=schema.n_classes,
                        dice=qc.get("skull_strip_dice"), anchor=anchor)
        lap("QC montage")
    log.info("[%s] done in %.1f s (%s)", subject, sum(seconds.values()),
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return qc


def _coregister_modalities(subject, images, anchor, f, cfg, seed):
    """Rigid co-registration of every other modality to the anchor (the T1; ``cfg["mode"]``:
    ``auto``, only modalities whose grid differs from the anchor's; ``always``). Writes one transform per modality
    (identity when not registered) and ``coregistration/qc.json``; returns modality -> transform
    for the registered ones."""
    mode = cfg.get("mode", "auto")
    records, used = {}, {}
    for m in (m for m in images if m != anchor):
        if mode == "always" or not same_grid(images[m], images[anchor]):
            log.info("[%s] co-registration %s -> %s (rigid)", subject, m, anchor)
            rec = coregister(f("n4", m), f("n4", anchor), f("coregistration", m),
                             iterations=cfg.get("iterations", (200, 100, 50)), seed=seed)
            used[m] = f("coregistration", m)
            records[m] = {"coregistered": True, **rec}
        else:
            _write_identity(f("coregistration", m))
            records[m] = {"coregistered": False}
    registered = [r["after"]["mask_dice"] for r in records.values() if r["coregistered"]]
    save_json({"subject": subject, "modalities": records,
               "coregistration_mask_dice": min(registered) if registered else None}, f("coregistration_qc"))
    return used


def preprocessed_manifest(rows, modalities, out_tsv):
    """Table of preprocessed subjects (one split): id columns and the working-grid files.

    ``rows``: dicts with ``subject``, ``folder``, id columns (site, split, role...) and
    optionally ``modalities`` (the subject's own; default ``modalities``: a modality it lacks
    is an empty cell). Every folder must be complete (:func:`subject_files`); a gap is named,
    so a consumer never reads a half-made subject.
    """
    import pandas as pd

    from .errors import InputError, InputErrors

    errors, records = [], []
    for row in rows:
        row = dict(row)
        folder, own = row["folder"], row.pop("modalities", None) or list(modalities)
        missing = [str(p) for p in subject_files(folder, own) if not p.exists()]
        if missing:
            errors.append(InputError(f"preprocessed subject {row['subject']} lacks {len(missing)} file(s), "
                                     f"e.g. {missing[0]}", file=folder,
                                     fix="delete the folder and run snakemake again to rebuild it"))
            continue
        row.update({m: (str(subject_file(folder, "image", m)) if m in own else None) for m in modalities})
        row.update({k: str(subject_file(folder, k)) for k in ("brain_mask", "label", "tissue_prob")})
        records.append(row)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InputErrors(errors)
    from .io import save_table

    return save_table(pd.DataFrame.from_records(records), out_tsv)
