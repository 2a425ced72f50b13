"""Label consistency of synthetic images: the workflow's real-data segmenter of a task, run on
synthetic images and scored against the label maps they were generated from, beside the same
segmenter on real test images.

Why: an image generator can produce plausible-looking images whose contrast does not say what
their label map says (a FLAIR with grey and white matter swapped, a lesion with the intensity
of white matter). A segmenter that learned the anatomy from real images then misreads them;
the gap between its Dice on synthetic and on real images measures that, per class.

Lesion classes are also scored apart on the samples whose conditioning asked for their lesion
type and on those holding it unrequested: a label generator that leaks a few voxels of one lesion
type into maps asked for another draws fragments the image generator renders like the requested
lesion (in the 2026-12-07 demo, oedema specks beside WMH), and a real tumour model mostly calls
them no tumour. Pooled, they hide how well the lesions that were asked for are rendered, so for a
lesion class the ``requested`` row carries the target; the ``unrequested`` row measures the leak
and has no pass.
"""

from __future__ import annotations

import pandas as pd

from .errors import InputError

COLUMNS = ["task", "arm", "class", "subset", "synthetic_dice", "synthetic_std", "n_synthetic", "real_test_set",
           "real_dice", "real_std", "n_real", "gap", "max_gap", "pass"]


def _dice_with_truth(scores):
    """Dice rows of the subjects whose ground truth holds the class (an empty truth scores 1 by
    convention, which says nothing about whether a present class is recognised)."""
    need = {"subject", "class", "metric", "value"}
    missing = need - set(scores.columns)
    if missing:
        raise InputError(f"score table lacks columns {sorted(missing)}", fix="pass brainsynth.metrics long scores")
    key = ["subject", "class"] + (["test_set"] if "test_set" in scores.columns else [])
    wide = scores.pivot_table(index=key, columns="metric", values="value", aggfunc="first").reset_index()
    if "truth_voxels" in wide.columns:
        wide = wide[wide["truth_voxels"] > 0]
    return wide


def requested_samples(manifest, classes, lesion_types):
    """``{task class: synthetic subjects whose conditioning asked for its lesion type}`` for the
    task classes made of lesion classes only (``classes``: task class -> schema values;
    ``lesion_types``: lesion type -> its schema values); asked = ``dc_<type>`` > 0 in the
    sampling ``manifest`` for any type the class draws on (so for a class spanning several types a
    leak of one into a request for another counts as requested)."""
    out = {}
    lesion_values = {v for vs in lesion_types.values() for v in vs}
    for cls, values in classes.items():
        if not values or not set(values) <= lesion_values:
            continue
        types = [t for t, vs in lesion_types.items() if set(vs) & set(values)]
        missing = [f"dc_{t}" for t in types if f"dc_{t}" not in manifest.columns]
        if missing:
            raise InputError(f"the sampling manifest lacks {missing}", field="manifest",
                             fix="rerun the sampling rule")
        asked = (manifest[[f"dc_{t}" for t in types]] > 0).any(axis=1)
        out[cls] = set(manifest.loc[asked, "subject"].astype(str))
    return out


def consistency_table(synthetic_scores, real_scores, task, arm, real_test_set, max_gap=0.10, requested=None):
    """Per class of ``task``: mean (std, n) Dice of the real-data model ``arm`` on synthetic
    images against their own labels and on the real test set ``real_test_set``; ``gap`` = real
    minus synthetic, ``pass`` when the gap is at most ``max_gap``. Classes no synthetic label
    holds are reported with n_synthetic 0 and no pass. Every class has a row of ``subset``
    ``all``; a class in ``requested`` (:func:`requested_samples`) two more, ``requested`` (the
    samples holding it that asked for it: the row that carries the target) and ``unrequested``
    (those holding it unrequested: the leak, ``pass`` NA)."""
    syn = _dice_with_truth(synthetic_scores)
    real = _dice_with_truth(real_scores)
    if "test_set" in real.columns:
        real = real[real["test_set"] == real_test_set]
    if real.empty:
        raise InputError(f"no real scores of test set {real_test_set!r} with the class present",
                         field="real_scores", fix="score the reference arm on that test set first")
    requested = requested or {}
    rows = []
    for cls in dict.fromkeys(list(real["class"]) + list(syn["class"])):
        held = syn[syn["class"] == cls]
        real_dice = real.loc[real["class"] == cls, "dice"]
        asked = held["subject"].astype(str).isin(requested.get(cls, ()))
        subsets = [("all", held)] + ([("requested", held[asked]), ("unrequested", held[~asked])]
                                     if cls in requested else [])
        for subset, part in subsets:
            rows.append(_row(task, arm, cls, subset, part["dice"], real_dice, real_test_set, max_gap))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(task, arm, cls, subset, s, r, real_test_set, max_gap):
    """One table row: synthetic Dice ``s`` against real Dice ``r`` of one class."""
    gap = float(r.mean() - s.mean()) if len(s) and len(r) else float("nan")
    passed = None if subset == "unrequested" else bool(gap <= max_gap) if gap == gap else False
    return {"task": task, "arm": arm, "class": cls, "subset": subset,
            "synthetic_dice": float(s.mean()) if len(s) else float("nan"),
            "synthetic_std": float(s.std(ddof=0)) if len(s) else float("nan"), "n_synthetic": len(s),
            "real_test_set": real_test_set, "real_dice": float(r.mean()) if len(r) else float("nan"),
            "real_std": float(r.std(ddof=0)) if len(r) else float("nan"), "n_real": len(r),
            "gap": gap, "max_gap": float(max_gap), "pass": passed}
