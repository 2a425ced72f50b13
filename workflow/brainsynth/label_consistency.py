"""Label consistency of synthetic images: the workflow's real-data segmenter of a task, run on
synthetic images and scored against the label maps they were generated from, beside the same
segmenter on real test images.

Why: an image generator can produce plausible-looking images whose contrast does not say what
their label map says (a FLAIR with grey and white matter swapped, a lesion with the intensity
of white matter). A segmenter that learned the anatomy from real images then misreads them;
the gap between its Dice on synthetic and on real images measures that, per class.
"""

from __future__ import annotations

import pandas as pd

from .errors import InputError

COLUMNS = ["task", "arm", "class", "synthetic_dice", "synthetic_std", "n_synthetic", "real_test_set",
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


def consistency_table(synthetic_scores, real_scores, task, arm, real_test_set, max_gap=0.10):
    """Per class of ``task``: mean (std, n) Dice of the real-data model ``arm`` on synthetic
    images against their own labels and on the real test set ``real_test_set``; ``gap`` = real
    minus synthetic, ``pass`` when the gap is at most ``max_gap``. Classes no synthetic label
    holds are reported with n_synthetic 0 and no pass."""
    syn = _dice_with_truth(synthetic_scores)
    real = _dice_with_truth(real_scores)
    if "test_set" in real.columns:
        real = real[real["test_set"] == real_test_set]
    if real.empty:
        raise InputError(f"no real scores of test set {real_test_set!r} with the class present",
                         field="real_scores", fix="score the reference arm on that test set first")
    rows = []
    for cls in dict.fromkeys(list(real["class"]) + list(syn["class"])):
        s = syn.loc[syn["class"] == cls, "dice"]
        r = real.loc[real["class"] == cls, "dice"]
        gap = float(r.mean() - s.mean()) if len(s) and len(r) else float("nan")
        rows.append({"task": task, "arm": arm, "class": cls,
                     "synthetic_dice": float(s.mean()) if len(s) else float("nan"),
                     "synthetic_std": float(s.std(ddof=0)) if len(s) else float("nan"), "n_synthetic": len(s),
                     "real_test_set": real_test_set, "real_dice": float(r.mean()) if len(r) else float("nan"),
                     "real_std": float(r.std(ddof=0)) if len(r) else float("nan"), "n_real": len(r),
                     "gap": gap, "max_gap": float(max_gap), "pass": bool(gap <= max_gap) if gap == gap else False})
    return pd.DataFrame(rows, columns=COLUMNS)
