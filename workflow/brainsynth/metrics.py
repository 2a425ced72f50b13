"""Segmentation metrics: per-class overlap scores, HD95, FP_tum, long tables.

Conventions (tested in ``tests/test_metrics.py``)
-------------------------------------------------
Counts are voxel counts of the binary masks: ``tp = pred & truth``,
``fp = pred & ~truth``, ``fn = ~pred & truth``, ``tn = ~pred & ~truth``.

=====================  ======  =========  ======  ========
case                    dice   precision  recall  accuracy
=====================  ======  =========  ======  ========
both empty              1.0      1.0       1.0    (tn/N)=1
empty pred, truth > 0   0.0      NaN       0.0    defined
pred > 0, empty truth   0.0      0.0       NaN    defined
otherwise               2tp/(2tp+fp+fn), tp/(tp+fp), tp/(tp+fn), (tp+tn)/N
=====================  ======  =========  ======  ========

* ``dice`` equals MONAI ``DiceMetric(include_background=True,
  ignore_empty=False)``: a correct empty prediction scores 1.0 (the study
  treats a correctly empty output as perfect) and any prediction against an
  empty truth scores 0.0.  nnU-Net instead reports NaN when both masks are
  empty; pass ``empty_score=float('nan')`` to :func:`binary_scores` to get
  that behaviour.
* ``precision`` / ``recall`` equal MONAI ``ConfusionMatrixMetric``
  ``"precision"`` / ``"sensitivity"``: NaN when the denominator is zero
  (precision with no predicted voxel, recall with no true voxel), except in
  the "both empty" case, which gets ``empty_score`` (1.0) for all three.
* ``accuracy`` is ``(tp + tn) / N`` over all voxels (NaN only for 0 voxels);
  it is dominated by background and reported for completeness.
* ``hd95`` is MONAI's ``compute_hausdorff_distance(percentile=95)`` (symmetric,
  Euclidean, in the units of ``spacing``: mm when spacing is the voxel size);
  NaN when either mask is empty. ``hd95_definition="brats"`` pools both
  directions before the percentile, as the BraTS evaluation (panoptica) does.
* ``fp_tum`` is the share (0..1) of ground-truth tumour voxels that the model
  labels as WMH; NaN when the subject has no tumour voxel.

Long table
----------
:func:`score_cohort` returns one row per (subject, class, metric) with the
columns :data:`LONG_COLUMNS`::

    experiment  arm  task  test_set  subject  class  metric  value

Metadata not supplied is filled with :data:`MISSING` (``"-"``, which pandas
does not read back as NaN, so ``groupby`` keeps those rows).  ``value`` is a
float; NaN is written as an empty cell.  Metrics per class are
:data:`OVERLAP_METRICS` (+ ``hd95`` when requested) and the voxel counts
``truth_voxels`` / ``pred_voxels``; FP_tum is one extra row per subject with
``class = "tumour"`` (see :data:`FP_TUM_CLASS`) and ``metric = "fp_tum"``.
Read it back with :func:`read_long`, which keeps ids such as ``"001"`` as
strings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

META_COLUMNS = ["experiment", "arm", "task", "test_set"]
LONG_COLUMNS = META_COLUMNS + ["subject", "class", "metric", "value"]
OVERLAP_METRICS = ["dice", "precision", "recall", "accuracy"]
COUNT_METRICS = ["truth_voxels", "pred_voxels"]
FP_TUM_METRIC = "fp_tum"
FP_TUM_CLASS = "tumour"
MISSING = "-"

__all__ = [
    "META_COLUMNS", "LONG_COLUMNS", "OVERLAP_METRICS", "COUNT_METRICS",
    "FP_TUM_METRIC", "FP_TUM_CLASS", "MISSING",
    "binary_scores", "hd95", "fp_tumour", "score_subject", "score_cohort",
    "read_long", "class_groups",
]


def _as_bool(a):
    arr = np.asarray(a)
    if arr.dtype != bool:
        arr = arr != 0
    return arr


def _check_shapes(pred, truth):
    if pred.shape != truth.shape:
        raise InputError(
            f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}",
            fix="resample the prediction onto the ground-truth grid",
        )


def _ratio(num, den):
    return float(num) / float(den) if den > 0 else float("nan")


def binary_scores(pred, truth, empty_score=1.0) -> dict:
    """Overlap scores of two binary masks (any non-zero voxel counts as True).

    Returns a dict with ``dice, precision, recall, accuracy`` (floats) and
    ``tp, fp, fn, tn`` (ints).  See the module docstring for the empty-mask
    conventions; ``empty_score`` is the dice/precision/recall given when both
    masks are empty (1.0 by default; ``nan`` reproduces nnU-Net).
    """
    p = _as_bool(pred)
    t = _as_bool(truth)
    _check_shapes(p, t)
    tp = int(np.count_nonzero(p & t))
    n_pred = int(np.count_nonzero(p))
    n_truth = int(np.count_nonzero(t))
    fp = n_pred - tp
    fn = n_truth - tp
    tn = int(p.size) - tp - fp - fn
    if n_pred == 0 and n_truth == 0:
        dice = precision = recall = float(empty_score)
    else:
        dice = 2.0 * tp / (2 * tp + fp + fn)
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
    accuracy = _ratio(tp + tn, p.size)
    return {
        "dice": dice, "precision": precision, "recall": recall, "accuracy": accuracy,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


HD95_DEFINITIONS = {
    "monai": "HD95: larger of the two directed 95th percentiles of surface distances (MONAI)",
    "brats": "HD95: 95th percentile of the pooled surface distances of both directions (BraTS / "
             "panoptica / medpy)",
}


def hd95(pred, truth, spacing=None, definition="monai") -> float:
    """95th-percentile Hausdorff distance, NaN if a mask is empty.

    ``definition``: ``"monai"`` (default) is MONAI's ``compute_hausdorff_distance
    (percentile=95)``, the larger of the two directed 95th percentiles; ``"brats"``
    is the 95th percentile of both directions' surface distances pooled (the
    official BraTS evaluation's panoptica, medpy). Both use MONAI's surface edges.
    ``spacing``: voxel size per axis (or one number), in mm for mm results;
    ``None`` means unit spacing (result in voxels).
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    if definition not in HD95_DEFINITIONS:
        raise InputError(f"unknown HD95 definition {definition!r}", field="segmentation.scoring.hd95_definition",
                         fix=f"use one of {sorted(HD95_DEFINITIONS)}")
    p = _as_bool(pred)
    t = _as_bool(truth)
    _check_shapes(p, t)
    if not p.any() or not t.any():
        return float("nan")
    if spacing is not None:
        spacing = [float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float))]
        if len(spacing) == 1:
            spacing = spacing * p.ndim
        if len(spacing) != p.ndim:
            raise InputError(f"spacing {spacing} has {len(spacing)} values for a {p.ndim}-D mask",
                             fix="give one voxel size per image axis")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(torch.from_numpy(p), torch.from_numpy(t),
                                                    spacing=spacing, symmetric=True)
    d = [x.double().reshape(-1) for x in distances]
    if definition == "brats":
        return float(torch.quantile(torch.cat(d), 0.95))
    return float(max(torch.quantile(x, 0.95) for x in d))


def _values(v) -> list:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        return [int(v)]
    return [int(x) for x in v]


def fp_tumour(pred_label, truth_label, wmh_value, tumour_values) -> float:
    """Share of ground-truth tumour voxels the prediction labels as WMH.

    ``wmh_value`` / ``tumour_values``: one label value or several.  Returns a
    fraction in [0, 1], NaN when ``truth_label`` has no tumour voxel.
    """
    pred = np.asarray(pred_label)
    truth = np.asarray(truth_label)
    _check_shapes(pred, truth)
    tum = np.isin(truth, _values(tumour_values))
    n = int(np.count_nonzero(tum))
    if n == 0:
        return float("nan")
    hit = int(np.count_nonzero(tum & np.isin(pred, _values(wmh_value))))
    return hit / n


def class_groups(schema, names=None, lesion_types=True) -> dict:
    """``{name: [values]}`` for :func:`score_subject` from a LabelSchema.

    ``names``: class names to score (default: all but background); with
    ``lesion_types`` every lesion type with more than one class (``tumour``)
    is added as a grouped class.
    """
    names = [n for n in schema.names if n != "background"] if names is None else list(names)
    groups = {n: [schema.value(n)] for n in names}
    if lesion_types:
        for lt, cs in schema.lesion_types.items():
            if len(cs) > 1 and lt not in groups:
                groups[lt] = [schema.value(c) for c in cs]
    return groups


def _fp_tum_spec(fp_tum):
    if fp_tum is None:
        return None
    if isinstance(fp_tum, Mapping):
        try:
            return fp_tum["wmh"], fp_tum["tumour"]
        except KeyError as exc:
            raise InputError(f"fp_tum mapping lacks key {exc}",
                             fix="pass {'wmh': value(s), 'tumour': value(s)}") from None
    wmh, tum = fp_tum
    return wmh, tum


def score_subject(pred_label, truth_label, classes, spacing=None, with_hd95=False,
                  fp_tum=None, empty_score=1.0, hd95_definition="monai") -> list[dict]:
    """Score one subject; returns long rows ``{"class", "metric", "value"}``.

    ``classes``: ``{name: value or [values]}``; several values are merged
    into one binary mask (e.g. ``tumour: [7, 8, 9]``).  ``fp_tum``:
    ``{"wmh": value(s), "tumour": value(s)}`` or a ``(wmh, tumour)`` pair to
    add the FP_tum row (class :data:`FP_TUM_CLASS`).
    """
    pred = np.asarray(pred_label)
    truth = np.asarray(truth_label)
    _check_shapes(pred, truth)
    rows = []
    for name, vals in classes.items():
        vals = _values(vals)
        p = np.isin(pred, vals)
        t = np.isin(truth, vals)
        s = binary_scores(p, t, empty_score=empty_score)
        for m in OVERLAP_METRICS:
            rows.append({"class": name, "metric": m, "value": float(s[m])})
        if with_hd95:
            rows.append({"class": name, "metric": "hd95", "value": hd95(p, t, spacing, hd95_definition)})
        rows.append({"class": name, "metric": "truth_voxels", "value": float(s["tp"] + s["fn"])})
        rows.append({"class": name, "metric": "pred_voxels", "value": float(s["tp"] + s["fp"])})
    spec = _fp_tum_spec(fp_tum)
    if spec is not None:
        rows.append({"class": FP_TUM_CLASS, "metric": FP_TUM_METRIC,
                     "value": fp_tumour(pred, truth, *spec)})
    return rows


def _load(x):
    """Array as-is, or (data, voxel size) for a NIfTI path."""
    if isinstance(x, (str, Path)):
        import nibabel as nib

        img = nib.load(str(x))
        return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.asarray(x), None


def score_cohort(pairs, classes, spacing=None, with_hd95=False, fp_tum=None,
                 empty_score=1.0, hd95_definition="monai", **meta) -> pd.DataFrame:
    """Score many subjects into one long DataFrame (columns :data:`LONG_COLUMNS`).

    ``pairs``: iterable of ``(subject, pred, truth)`` tuples or of dicts with
    keys ``subject, pred, truth`` plus optional metadata (``experiment, arm,
    task, test_set`` or any extra column) that override ``**meta``.
    ``pred`` / ``truth`` are label arrays or NIfTI paths; with paths and
    ``spacing=None`` the ground truth's voxel size is used for HD95.
    Extra metadata keys become columns between ``test_set`` and ``subject``.
    """
    records = []
    extra_cols: list[str] = []
    for item in pairs:
        if isinstance(item, Mapping):
            item = dict(item)
            try:
                subject, pred, truth = item.pop("subject"), item.pop("pred"), item.pop("truth")
            except KeyError as exc:
                raise InputError(f"score pair lacks key {exc}",
                                 fix="give subject, pred and truth") from None
            m = {**meta, **item}
        else:
            subject, pred, truth = item
            m = dict(meta)
        pred_arr, _ = _load(pred)
        truth_arr, zooms = _load(truth)
        sp = spacing if spacing is not None else zooms
        try:
            rows = score_subject(pred_arr, truth_arr, classes, spacing=sp, with_hd95=with_hd95,
                                 fp_tum=fp_tum, empty_score=empty_score, hd95_definition=hd95_definition)
        except InputError as exc:
            raise InputError(exc.problem, subject=str(subject), file=exc.file or
                             (str(pred) if isinstance(pred, (str, Path)) else None),
                             field=exc.field, fix=exc.fix) from None
        for k in m:
            if k not in META_COLUMNS and k not in extra_cols:
                extra_cols.append(k)
        for r in rows:
            records.append({**m, "subject": str(subject), **r})
    cols = META_COLUMNS + extra_cols + ["subject", "class", "metric", "value"]
    df = pd.DataFrame.from_records(records, columns=cols)
    for c in cols[:-1]:
        df[c] = df[c].astype(object).where(df[c].notna(), MISSING).astype(str)
    df["value"] = df["value"].astype(float)
    return df


def read_long(path) -> pd.DataFrame:
    """Read a long score TSV: id columns as strings, ``value`` as float."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("subject", "class", "metric", "value") if c not in df.columns]
    if missing:
        raise InputError(f"score table lacks columns {missing}", file=str(path),
                         fix="write it with brainsynth.metrics.score_cohort + io.save_table")
    df["value"] = pd.to_numeric(df["value"].replace("", np.nan), errors="coerce")
    return df
