"""Tissue offsets of the label decoder at sampling, fitted per trained label generator
(``label_generator.sampling.tissue_offsets: fit``, rule ``fit_label_sampling``).

The LDM's samples sit nearer the mean brain than its training maps do (README, "Diversity like
for like"); decoded, the mean brain's thin CSF rim loses the argmax in places, so on the demo the
samples hold about a sixth less CSF than the training maps of their phenotype. One offset per
tissue class, added to the decoder's logits on top of the VAE's class offsets
(``calibrate_label_vae``) and fitted so that maps drawn at the training maps' own conditioning hold
the training maps' mean tissue fractions, gives the volumes back; it gives back no diversity. The
VAE's reconstructions (the audit's gate) keep the VAE's offsets alone: these belong to sampling.
"""

from __future__ import annotations

import numpy as np
import torch

from . import label_generator as LG

#: log-ratio steps, each taking half of the way at first (the fractions respond to all offsets at once)
FIT_ROUNDS = 30
FIT_DAMPING = 0.5
#: the fit stops once every tissue is this close (relative) to its target
FIT_TOLERANCE = 0.002


def brain_fractions(labels, classes):
    """Mean over maps of each class's share of the brain (non-background) voxels of the label
    maps ``labels`` ``(N, *spatial)``: ``{class value: fraction}`` (lesions count in the brain)."""
    labels = torch.as_tensor(labels)
    brain = (labels > 0).flatten(1).sum(1).clamp(min=1).double()
    return {c: float(((labels == c).flatten(1).sum(1) / brain).mean()) for c in classes}


def fit_tissue_offsets(logits, target, rounds=FIT_ROUNDS, damping=FIT_DAMPING, tolerance=FIT_TOLERANCE):
    """Offsets ``(K,)`` added to ``logits`` ``(N, K, *spatial)`` such that the mean brain fraction
    of each class in ``target`` (``{class value: fraction}``) after argmax meets it: each round
    moves each class's offset by ``damping * log(target / drawn)`` (the log-ratio held within +-1),
    halving a class's damping whenever its error changes sign, and the offsets of the round
    nearest the targets (largest relative error) are kept. Classes not in ``target`` (background,
    lesions) and classes the target lacks (fraction 0: no training map holds them) keep 0.
    -> ``{"offsets", "before", "after", "round"}`` (the drawn fractions without and with them)."""
    offsets = torch.zeros(logits.shape[1], dtype=torch.float32)
    classes = sorted(c for c in target if target[c] > 0)
    scale = {c: float(damping) for c in classes}
    sign = {}
    before = best = None
    for r in range(int(rounds) + 1):
        drawn = brain_fractions(LG.with_class_offsets(logits, offsets).argmax(1), sorted(target))
        error = max((abs(drawn[c] / target[c] - 1) for c in classes), default=0.0)
        if before is None:
            before = drawn
        if best is None or error < best[0]:
            best = (error, offsets.clone(), drawn, r)
        if error <= tolerance:
            break
        for c in classes:
            ratio = float(np.clip(np.log(target[c] / max(drawn[c], 1e-6)), -1.0, 1.0))
            if sign.get(c, 0) * ratio < 0:
                scale[c] /= 2
            sign[c] = np.sign(ratio)
            offsets[c] += scale[c] * ratio
    return {"offsets": best[1], "before": before, "after": best[2], "round": best[3]}
