"""Checks of the input images before anything expensive runs.

For every subject of the sample sheet (see :mod:`brainsynth.sheet`):

* every file named in the sheet exists, is readable and is a NIfTI image;
* every image is one 3D volume (4D with a single volume is accepted);
* geometry (shape and affine, within :data:`AFFINE_ATOL_MM`) of the label map and
  the brain mask equals that of the image they were drawn on (column
  ``label_space``, default t1, or the subject's first modality when it has no T1); modalities may lie on grids of their own
  (preprocessing co-registers them to the T1);
* voxel values are finite (no NaN/Inf);
* images have content: not constant (all-zero included), and a non-zero
  support of at least :data:`MIN_SUPPORT_FRACTION` of the field of view;
* label values are integers and, after the site's optional ``label_map``
  (``{source_value: class_name}``), classes of the :class:`LabelSchema`, with
  at least one tissue voxel;
* a brain mask is not empty.

All problems are collected and raised together as :class:`InputErrors`.
"""

import os

import nibabel as nib
import numpy as np
import pandas as pd

from .errors import InputError, InputErrors
from .labels import LabelSchema
from .sheet import anchor_modality, site_modalities_of

AFFINE_ATOL_MM = 1e-3
#: A head fills 30-60% of a typical field of view, a skull-stripped brain 10-20%; an
#: image non-zero on under 1% of its voxels is a failed export or the wrong file.
MIN_SUPPORT_FRACTION = 0.01
NIFTI_CLASSES = (nib.Nifti1Image, nib.Nifti2Image)


def _fmt_shape(shape):
    return "x".join(str(int(s)) for s in shape)


def _fmt_zooms(zooms):
    return "x".join(f"{float(z):.4g}" for z in zooms) + " mm"


def _is_empty(v):
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    return isinstance(v, str) and v.strip() == ""


def _get(row, key):
    try:
        v = row.get(key)
    except AttributeError:
        v = row[key] if key in row else None
    return None if _is_empty(v) else v


# --------------------------------------------------------------------------- label maps
def normalise_label_map(label_map, schema):
    """``{source_value: class name or value}`` -> ``{int source: int class value}``.

    ``None`` -> ``None`` (label values are already schema values). The string
    ``"brats"`` stands for :data:`brainsynth.ingest.BRATS_LABEL_MAP`. Source
    value 0 maps to background unless the map says otherwise; every other
    source value missing from the map is unknown.
    """
    if label_map is None:
        return None
    if isinstance(label_map, str):
        if label_map.lower() == "brats":
            from .ingest import BRATS_LABEL_MAP

            label_map = BRATS_LABEL_MAP
        else:
            raise InputError(f"unknown label_map preset {label_map!r}", field="label_map",
                             fix="give a mapping {source_value: class_name} or the preset 'brats'")
    if not isinstance(label_map, dict):
        raise InputError(f"label_map must be a mapping, got {type(label_map).__name__}", field="label_map",
                         fix="give a mapping {source_value: class_name}, e.g. {1: necrotic, 2: oedema, 4: enhancing}")
    lookup = {}
    for src, dst in label_map.items():
        try:
            s = int(src)
            if isinstance(src, float) and s != src:
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(f"label_map source value {src!r} is not an integer", field="label_map",
                             fix="use the integer voxel values of the label files as keys") from None
        if isinstance(dst, str):
            if dst not in schema.classes:
                raise InputError(f"label_map maps {s} to {dst!r}, which is not a class of the label schema "
                                 f"(classes: {', '.join(schema.names)})", field="label_map",
                                 fix="use a class name from config labels.classes or declare the class there")
            d = schema.classes[dst]
        elif isinstance(dst, (int, np.integer)) and not isinstance(dst, bool) and int(dst) in schema.values:
            d = int(dst)
        else:
            raise InputError(f"label_map maps {s} to {dst!r}, which is not a class of the label schema",
                             field="label_map", fix="map every source value to a class name of config labels.classes")
        lookup[s] = d
    lookup.setdefault(0, schema.classes.get("background", 0))
    return lookup


def _allowed_values(lookup, schema):
    return set(schema.values) if lookup is None else set(lookup)


def _label_values(arr):
    """Unique values of an integer-valued label array (checked by the caller)."""
    if arr.dtype.kind in "ui":
        if arr.size and arr.min() >= 0 and arr.max() < 1 << 16:
            counts = np.bincount(arr.ravel().astype(np.intp, copy=False))
            vals = np.flatnonzero(counts)
            return vals, counts[vals]
    vals, counts = np.unique(arr, return_counts=True)
    return vals, counts


def _out_dtype(schema):
    return np.uint8 if max(schema.values) < 256 else np.uint16


def _non_integer(arr):
    """Number of voxels that are not integer-valued (floats only)."""
    if arr.dtype.kind not in "fc":
        return 0
    return int(np.count_nonzero(arr != np.round(arr)))


def apply_label_map(label_array, label_map, schema):
    """Translate a label array into schema class values.

    ``label_map`` is ``{source_value: class_name}`` (or ``None`` when the
    values already are schema values; the preset ``"brats"`` is accepted).
    Returns an ``uint8`` array (``uint16`` for > 255 classes). Raises
    :class:`InputError` for non-integer, non-finite or unknown values.
    """
    schema = schema if schema is not None else LabelSchema()
    arr = np.asanyarray(label_array)
    lookup = normalise_label_map(label_map, schema)
    if arr.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"label map has {bad} NaN/Inf voxels", field="label",
                             fix="fix the label file (values must be integer class values)")
        n = _non_integer(arr)
        if n:
            raise InputError(f"label map has {n} non-integer voxel values (resampled with linear interpolation?)",
                             field="label", fix="resample label maps with nearest-neighbour interpolation")
        arr = arr.astype(np.int64)
    vals, counts = _label_values(arr)
    allowed = _allowed_values(lookup, schema)
    unknown = [int(v) for v in vals if int(v) not in allowed]
    if unknown:
        raise InputError(f"label values {unknown} are not in the label schema"
                         + ("" if lookup is None else " or the label_map"), field="label",
                         fix="add a label_map {source_value: class_name} for this site in config or fix the label file")
    dtype = _out_dtype(schema)
    if lookup is None:
        return arr.astype(dtype)
    if len(vals) == 0:
        return arr.astype(dtype)
    lo, hi = int(vals[0]), int(vals[-1])
    if lo >= 0 and hi < 1 << 16:
        lut = np.zeros(hi + 1, dtype=dtype)
        for s, d in lookup.items():
            if 0 <= s <= hi:
                lut[s] = d
        return lut[arr]
    mapped = np.array([lookup[int(v)] for v in vals], dtype=dtype)
    return mapped[np.searchsorted(vals, arr)]


# --------------------------------------------------------------------------- images
class _Image:
    def __init__(self, role, path, img, shape):
        self.role, self.path, self.img, self.shape = role, path, img, shape
        self.zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        self.affine = img.affine

    @property
    def name(self):
        return os.path.basename(self.path)

    def describe(self):
        return f"{self.role} {self.name!r} (shape {_fmt_shape(self.shape)}, voxel {_fmt_zooms(self.zooms)})"

    def data(self):
        arr = np.asanyarray(self.img.dataobj)
        if arr.shape != self.shape:
            arr = arr.reshape(self.shape)
        return arr


def _open(path, role, subject):
    """(image, None) or (None, InputError). Reads only the header."""
    p = str(path)
    fix_path = (f"correct the {role!r} path in the sample sheet "
                "(relative paths are relative to the sheet's directory)")
    if not os.path.exists(p):
        return None, InputError(f"{role} file does not exist", subject=subject, file=p, field=role, fix=fix_path)
    if os.path.isdir(p):
        return None, InputError(f"{role} path is a directory, not a NIfTI file", subject=subject, file=p,
                                field=role, fix=fix_path)
    if not os.access(p, os.R_OK):
        return None, InputError(f"{role} file is not readable (permission denied)", subject=subject, file=p,
                                field=role, fix="make the file readable (chmod a+r) or copy it")
    fix_nifti = "convert it to NIfTI (.nii or .nii.gz, e.g. with dcm2niix) or correct the path in the sample sheet"
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises many types for garbage input
        return None, InputError(f"{role} file is not a NIfTI image (nibabel: {type(exc).__name__}: {exc})",
                                subject=subject, file=p, field=role, fix=fix_nifti)
    if not isinstance(img, NIFTI_CLASSES):
        return None, InputError(f"{role} file is not a NIfTI image (it is read as {type(img).__name__})",
                                subject=subject, file=p, field=role, fix=fix_nifti)
    shape = tuple(int(s) for s in img.shape)
    full = shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) <= 1:
        return None, InputError(f"{role} is a 2D image (shape {_fmt_shape(full)}); a 3D volume is needed",
                                subject=subject, file=p, field=role,
                                fix="provide the full 3D volume (not a single slice)")
    if len(shape) > 3:
        n = int(np.prod(shape[3:]))
        return None, InputError(
            f"{role} is a 4D image with {n} volumes (shape {_fmt_shape(full)}); one 3D volume is needed",
            subject=subject, file=p, field=role,
            fix="extract the volume to use (e.g. 'fslroi in.nii.gz out.nii.gz 0 1') and point the sheet at it")
    return _Image(role, p, img, shape), None


def _read(im, subject):
    try:
        return im.data(), None
    except Exception as exc:
        return None, InputError(f"{im.role} voxel data could not be read, the file is truncated or corrupt "
                                f"({type(exc).__name__}: {exc})", subject=subject, file=im.path, field=im.role,
                                fix="re-export or re-download the file")


def _n_nonfinite(arr):
    if arr.dtype.kind not in "fc":
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def _check_subject(row, modalities, schema, label_map=None):
    """(errors, info dict) for one sheet row."""
    schema = schema if schema is not None else LabelSchema()
    subject = _get(row, "subject") or "<no subject id>"
    site = _get(row, "site")
    errors = []
    anchor = anchor_modality(modalities or ["t1"])
    roles = [anchor] + [m for m in (modalities or []) if m != anchor]
    files = []
    for role in roles:
        path = _get(row, role)
        if path is None:
            errors.append(InputError(f"no {role} image in the sample sheet, but {role!r} is a required modality",
                                     subject=subject, field=role,
                                     fix=f"fill in the {role!r} path, remove {role!r} from config 'modalities', "
                                         f"or list what site {site!r} delivers under config 'site_modalities'"))
        else:
            files.append((role, path))
    for role in ("label", "brain_mask"):
        path = _get(row, role)
        if path is not None:
            files.append((role, path))

    images = {}
    for role, path in files:
        im, err = _open(path, role, subject)
        if err is not None:
            errors.append(err)
        else:
            images[role] = im

    label_space = _get(row, "label_space") or anchor
    if label_space not in roles:
        errors.append(InputError(
            f"label_space {label_space!r} is not one of the modalities {roles}", subject=subject,
            field="label_space", fix="name the modality whose grid the label map and brain mask were drawn on "
                                     f"(default {anchor}), or leave the cell empty"))
    ref = images.get(label_space)
    if ref is not None:
        for role in ("label", "brain_mask"):
            im = images.get(role)
            if im is None:
                continue
            same_shape = im.shape == ref.shape
            diff = float(np.max(np.abs(im.affine - ref.affine)))
            if not same_shape or diff > AFFINE_ATOL_MM:
                what = "shape" if not same_shape else f"affine (max difference {diff:.4g} mm)"
                errors.append(InputError(
                    f"geometry mismatch: {im.describe()} differs from {label_space} {ref.name!r} "
                    f"(shape {_fmt_shape(ref.shape)}, voxel {_fmt_zooms(ref.zooms)}) in {what}",
                    subject=subject, file=im.path, field=role,
                    fix=f"{role} must lie on the grid of the image it was drawn on: set the sheet's label_space "
                        f"column to that modality, or resample {im.name} onto the {label_space} grid "
                        "(nearest-neighbour interpolation)"))
    ref = images.get(anchor)

    info = {"subject": subject, "site": site, "split": _get(row, "split"),
            "shape": _fmt_shape(ref.shape) if ref is not None else None,
            "voxel_mm": _fmt_zooms(ref.zooms)[:-3] if ref is not None else None,
            "label_values": None, "label_classes": None, "tissue_from": "atropos" if "label" not in images else "label"}

    lookup = None
    if "label" in images and label_map is not None:
        try:
            lookup = normalise_label_map(label_map, schema)
        except InputError as exc:
            errors.append(InputError(exc.problem + (f" (label_map of site {site!r})" if site else ""),
                                     subject=subject, field="label_map", fix=exc.fix))
            images.pop("label")

    for role, im in images.items():
        arr, err = _read(im, subject)
        if err is not None:
            errors.append(err)
            continue
        n_bad = _n_nonfinite(arr)
        if n_bad:
            errors.append(InputError(
                f"{role} has {n_bad} NaN/Inf voxel(s) of {arr.size}", subject=subject, file=im.path, field=role,
                fix="replace NaN/Inf with 0 (e.g. 'fslmaths in -nan out') or re-export the image"))
            continue
        if role not in ("label", "brain_mask"):
            err = _content_problem(arr, im, subject)
            if err is not None:
                errors.append(err)
        elif role == "brain_mask":
            if not np.any(arr):
                errors.append(InputError("brain_mask is empty (all voxels are 0)", subject=subject,
                                         file=im.path, field=role, fix="provide a non-empty brain mask or leave "
                                                                       "the brain_mask cell empty"))
        elif role == "label":
            n = _non_integer(arr)
            if n:
                errors.append(InputError(
                    f"label has {n} non-integer voxel value(s) (resampled with linear interpolation?)",
                    subject=subject, file=im.path, field=role,
                    fix="resample label maps with nearest-neighbour interpolation"))
                continue
            vals, counts = _label_values(arr.astype(np.int64) if arr.dtype.kind in "fc" else arr)
            info["label_values"] = " ".join(str(int(v)) for v in vals)
            allowed = _allowed_values(lookup, schema)
            unknown = [(int(v), int(c)) for v, c in zip(vals, counts) if int(v) not in allowed]
            if unknown:
                listed = ", ".join(f"{v} ({c} voxels)" for v, c in unknown)
                if lookup is None:
                    known = ", ".join(f"{v}={n}" for v, n in zip(schema.values, schema.names))
                    problem = f"label values not in the label schema: {listed}; schema classes are {known}"
                else:
                    problem = (f"label values not in the label_map of site {site!r}: {listed}; "
                               f"mapped values are {', '.join(str(v) for v in sorted(lookup))}")
                example = "e.g. BraTS {1: necrotic, 2: oedema, 4: enhancing}"
                errors.append(InputError(
                    problem, subject=subject, file=im.path, field=role,
                    fix=f"add a label_map for site {site!r} in config ({{source_value: class_name}}, "
                        f"{example}) or fix the label file"))
                continue
            present = {int(v) if lookup is None else lookup[int(v)] for v, c in zip(vals, counts) if c}
            names = [n for v, n in zip(schema.values, schema.names) if v in present]
            info["label_classes"] = " ".join(names)
            tissue_values = {schema.value(t) for t in schema.tissues}
            lesion_only_site = lookup is not None and not set(lookup.values()) & tissue_values
            if lesion_only_site:
                info["tissue_from"] = "atropos"
            elif not set(names) & set(schema.tissues):
                errors.append(InputError(
                    f"label map has no tissue at all (classes present: {', '.join(names) or 'none'}; "
                    f"tissue classes are {', '.join(schema.tissues)})", subject=subject, file=im.path, field=role,
                    fix="point the sheet at the full label map (tissue + lesions); for a dataset whose label maps "
                        "hold lesions only (BraTS), declare the site's label_maps entry (e.g. brats): tissue then "
                        "comes from Atropos; or leave the label cell empty"))
    info["n_problems"] = len(errors)
    return errors, info


def _content_problem(arr, im, subject):
    """An image without usable content (constant, all-zero, or almost empty), as an InputError."""
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo == hi:
        what = "all-zero" if hi == 0 else f"constant (every voxel is {hi:g})"
        return InputError(f"{im.role} is {what}: no image content", subject=subject, file=im.path, field=im.role,
                          fix="re-export the image from the scanner data or point the sheet at the right file")
    support = float(np.count_nonzero(arr)) / arr.size
    if support < MIN_SUPPORT_FRACTION:
        return InputError(
            f"{im.role} is non-zero on only {100 * support:.2g}% of its voxels (a brain fills > 10% of a field of "
            f"view): the image is almost empty", subject=subject, file=im.path, field=im.role,
            fix="check the export (a mask or a single slab saved instead of the volume?) and point the sheet at "
                "the full image")
    return None


def check_subject(row, modalities, schema, label_map=None):
    """All problems of one sample-sheet row (dict or pandas Series) as a list of InputError."""
    return _check_subject(row, modalities, schema, label_map)[0]


def validate_cohort(df, modalities, schema, label_maps=None, site_modalities=None):
    """Check every subject of the sheet; raise InputErrors listing every problem.

    ``label_maps`` is ``{site: label_map}`` (``label_map`` as for
    :func:`apply_label_map`); ``site_modalities`` is ``{site: [modalities]}`` for sites that
    deliver a subset of ``modalities`` (:func:`brainsynth.sheet.site_modalities_of`). Returns a summary DataFrame (subject, site,
    split, shape, voxel_mm, label_values, n_problems) when all is well.
    """
    schema = schema if schema is not None else LabelSchema()
    label_maps = label_maps or {}
    errors, infos = [], []
    for site, lm in label_maps.items():
        try:
            normalise_label_map(lm, schema)
        except InputError as exc:
            errors.append(InputError(f"{exc.problem} (site {site!r})", field=f"label_maps.{site}", fix=exc.fix))
    bad_sites = {e.field.split(".", 1)[1] for e in errors}
    rows = df.to_dict("records") if isinstance(df, pd.DataFrame) else list(df)
    for row in rows:
        site = _get(row, "site")
        lm = None if site in bad_sites else label_maps.get(site)
        errs, info = _check_subject(row, site_modalities_of(site, modalities, site_modalities), schema, lm)
        errors.extend(errs)
        infos.append(info)
    if errors:
        raise InputErrors(errors)
    return pd.DataFrame(infos, columns=["subject", "site", "split", "shape", "voxel_mm", "label_values",
                                        "label_classes", "tissue_from", "n_problems"])



def check_files_exist(df, modalities):
    """Cheap parse-time check that every file named in the sheet exists.

    Runs when Snakemake starts (so a missing file is reported with its subject
    and column before any job is scheduled); the full per-file checks run in
    the ``validate_inputs`` rule.
    """
    columns = [c for c in list(modalities) + ["label", "brain_mask"] if c in df.columns]
    subjects = df["subject"].tolist() if "subject" in df.columns else list(df.index)
    values = {c: df[c].tolist() for c in columns}  # column lists: iterrows costs ~50 us a row
    errors = []
    for i, subject in enumerate(subjects):
        for col in columns:
            path = values[col][i]
            if not _is_empty(path) and not os.path.exists(str(path)):
                errors.append(InputError(
                    f"{col} file does not exist", subject=subject, file=path,
                    field=col, fix=f"correct the {col!r} path in the sample sheet "
                                   "(relative paths are relative to the sheet's directory)"))
    if errors:
        raise InputErrors(errors)
