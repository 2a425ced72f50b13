"""Tissue offsets of the label decoder at sampling, fitted per trained label generator
(``label_generator.sampling.tissue_offsets: fit``, rule ``fit_tissue_offsets``).

The LDM's samples sit nearer the mean brain than its training maps do (README, "Diversity like
for like"); decoded, the mean brain's thin CSF rim loses the argmax in places, so on the demo the
samples hold about a sixth less CSF than the training maps of their phenotype. One offset per
tissue class, added to the decoder's logits on top of the VAE's class offsets
(``calibrate_label_vae``) and fitted so that maps drawn at the training maps' own conditioning hold
the training maps' mean tissue fractions, gives the volumes back; it gives back no diversity. The
VAE's reconstructions (the audit's gate) keep the VAE's offsets alone: these belong to sampling.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ...io import save_json
from ...labels import LabelSchema
from .. import common as C
from . import label_generator as LG

log = logging.getLogger(__name__)

#: seed of the fit's noise: apart from the audit's (0) and the sample sets' seeds
FIT_SEED = 11
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


def fit_sampling_calibration(vae_path, ldm_path, calibration, training_maps, out_path, *, sampling=None,
                             schema=None, device="auto", num_threads=None, seed=FIT_SEED):
    """Sample one map at each training map's conditioning, fit the tissue offsets
    (:func:`fit_tissue_offsets`) against the training maps' mean tissue fractions, and write the
    calibration sampling decodes with: the VAE's class offsets (``calibration``, its JSON) plus these,
    its temperature, and beside them the VAE's offsets, the tissue offsets and the fractions before
    and after."""
    C.set_threads(num_threads)
    schema = schema or LabelSchema()
    base, temperature = LG.load_calibration(calibration, schema.n_classes)
    base = torch.zeros(schema.n_classes) if base is None else base
    truth = np.stack([C.load_prob_label(p, schema.n_classes).argmax(0).astype(np.uint8) for p in training_maps])
    tissues = {schema.value(t): t for t in schema.tissues}
    target = brain_fractions(truth, tissues)
    _, train_values = LG.training_conditioning(ldm_path)
    probs = LG.sample_labels(vae_path, ldm_path, np.asarray(train_values, np.float32), seed=seed, device=device,
                             progress=False, batch_size=4, calibration=calibration, sampling=sampling)
    # log-probabilities times the temperature: the logits less a per-voxel constant, same argmax
    logits = torch.log(torch.from_numpy(probs).clamp_min(1e-30)) * temperature
    del probs
    fit = fit_tissue_offsets(logits, target)
    offsets, before, after = fit["offsets"], fit["before"], fit["after"]
    relative = {c: (f"{before[c] / target[c] - 1:+.1%} -> {after[c] / target[c] - 1:+.1%}" if target[c] else
                    "absent from the training maps, not fitted") for c in tissues}
    record = {"class_offsets": [round(float(b) + float(o), 6) for b, o in zip(base, offsets)],
              "temperature": temperature, "vae_class_offsets": [round(float(b), 6) for b in base],
              "tissue_offsets": {tissues[c]: round(float(offsets[c]), 6) for c in tissues},
              "tissue_fit": {"maps": len(truth), "seed": int(seed), "round": fit["round"],
                             **{f"{tissues[c]}_training": round(target[c], 6) for c in tissues},
                             **{f"{tissues[c]}_before": round(before[c], 6) for c in tissues},
                             **{f"{tissues[c]}_after": round(after[c], 6) for c in tissues}}}
    save_json(record, out_path)
    log.info("tissue offsets at sampling on %d maps at the training conditioning (round %d): %s; drawn vs training "
             "before -> after: %s", len(truth), fit["round"],
             ", ".join(f"{tissues[c]} {offsets[c]:+.3f}" for c in tissues),
             ", ".join(f"{tissues[c]} {relative[c]}" for c in tissues))
    return record
