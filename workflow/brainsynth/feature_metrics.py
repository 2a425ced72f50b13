"""Distribution metrics on feature sets ``(N, D)``: FID and improved precision / recall.

Shared by the label generator's audit (features of its own label VAE encoder) and the image
audit of the segmentation stage (features of the real-data nnU-Net's encoder): both are
in-domain extractors that work offline. Tested against hand-computed cases.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def frechet_distance(real, synthetic):
    """FID between two feature sets ``(N, D)`` (monai ``FIDMetric``: Gaussian fits, Frechet
    distance); 0 for identical sets."""
    import torch
    from monai.metrics import FIDMetric

    a = torch.as_tensor(np.asarray(synthetic, dtype=np.float64))
    b = torch.as_tensor(np.asarray(real, dtype=np.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"FID needs two (N >= 2, D) feature sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(FIDMetric()(a, b))


def _distances(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


def knn_precision_recall(real, synthetic, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its points with radius the distance to the k-th nearest neighbour in the
    set; precision = share of synthetic points inside the real manifold (fidelity), recall =
    share of real points inside the synthetic manifold (coverage)."""
    real = np.asarray(real, dtype=float)
    synthetic = np.asarray(synthetic, dtype=float)
    if min(len(real), len(synthetic)) <= k:
        raise InputError(f"k-NN precision/recall with k={k} needs more than {k} points per set")

    def radii(x):
        return np.sort(_distances(x, x), axis=1)[:, k]  # column 0 is the point itself

    precision = float((_distances(synthetic, real) <= radii(real)[None, :]).any(1).mean())
    recall = float((_distances(real, synthetic) <= radii(synthetic)[None, :]).any(1).mean())
    return precision, recall


def against_reference(reference, sets, k=3):
    """Rows ``{set, n, n_reference, fid, precision, recall}``: each named feature set of ``sets``
    against the ``reference`` features (FID NaN below 2 points a set, precision / recall NaN
    at <= k points: too few to fit or to draw a manifold)."""
    rows = []
    for name, feats in sets.items():
        feats = np.asarray(feats, dtype=float)
        n = min(len(feats), len(reference))
        p, r = knn_precision_recall(reference, feats, k) if n > k else (float("nan"), float("nan"))
        rows.append({"set": name, "n": len(feats), "n_reference": len(reference),
                     "fid": frechet_distance(reference, feats) if n >= 2 else float("nan"),
                     "precision": p, "recall": r})
    return rows
