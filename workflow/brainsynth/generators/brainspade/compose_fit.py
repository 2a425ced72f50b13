"""The compose weight of each lesion type, fitted per trained label generator
(``label_generator.sampling.compose_weight: fit``, rule ``fit_compose_weight``).

A WMH + tumour request is sampled as ``null + w (healthy - null) + w sum_j k_j (type j alone -
healthy)``. How large each type comes out of that sum is a property of the trained model, not
of composition: one seed's demo model drew the composed WMH at a third of the size it draws for
WMH alone, another's at the same size (README, "A weight per lesion type in composed
requests"). So ``k_j`` is fitted after training, as the VAE's class offsets are: on a few
requests of every lesion type at once, the weight whose composed volume of type j matches the
volume the model draws for type j alone at the same dc, from the same initial noise.
"""

from __future__ import annotations

import logging

import numpy as np

from ...errors import InputError
from ...io import save_json
from ...labels import LabelSchema
from .. import common as C
from . import label_generator as LG

log = logging.getLogger(__name__)

#: requests sampled per weight tried (each a full DDIM chain with 2 + n_types passes per step)
FIT_REQUESTS = 8
#: the factor between the weights tried, and the range searched
FIT_STEP = 1.5
FIT_RANGE = (0.25, 4.0)
#: seed of the fit's requests and noise: apart from the audit's and the sample sets' seeds
FIT_SEED = 7


def fitted_weight(trace, target):
    """The weight whose median volume meets ``target``, from ``trace`` (``[(weight, median
    voxels)]`` in the order tried, the volume rising with the weight): linear between the two
    tried weights that bracket the target, else the tried weight closest to it."""
    pts = sorted(trace)
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if min(v0, v1) <= target <= max(v0, v1) and v0 != v1:
            return float(k0 + (target - v0) * (k1 - k0) / (v1 - v0))
    return float(min(pts, key=lambda p: (abs(p[1] - target), abs(np.log(p[0]))))[0])


def search_weight(volume_at, target, start=1.0):
    """Try weights from ``start`` by factors of :data:`FIT_STEP` towards ``target`` (up while the
    median volume ``volume_at(k)`` lies below it, down while above) until it is crossed or
    :data:`FIT_RANGE` is left; returns ``(weight, trace)``."""
    trace = [(start, volume_at(start))]
    if trace[0][1] == target:
        return start, trace
    up = trace[0][1] < target
    k = start
    while True:
        k = k * FIT_STEP if up else k / FIT_STEP
        if not FIT_RANGE[0] <= k <= FIT_RANGE[1]:
            break
        trace.append((k, volume_at(k)))
        if (trace[-1][1] >= target) if up else (trace[-1][1] <= target):
            break
    return fitted_weight(trace, target), trace


def fit_compose_weights(vae_path, ldm_path, out_path, *, sampling=None, calibration=None, schema=None,
                        device="auto", num_threads=None, n_requests=FIT_REQUESTS):
    """Fit ``k_j`` per lesion type (in the LDM's type order, each with the others at their fitted
    value or 1) on ``n_requests`` requests of every type at once (dc of each type drawn from the
    training maps holding it), and write them as JSON with the volumes behind them."""
    C.set_threads(num_threads)
    schema = schema or LabelSchema()
    types, train_values = LG.training_conditioning(ldm_path)
    if len(types) < 2:
        raise InputError(f"compose_weight: fit needs an LDM of two or more lesion types, this one has {types}",
                         file=ldm_path, field="label_generator.sampling.compose_weight",
                         fix="set compose_weight to a number (e.g. 1)")
    requests = LG.make_conditioning("unseen", n_requests, types, train_values, seed=FIT_SEED)
    samp = {**(sampling or {}), "compose_lesion_types": True}

    def volumes(cond, weights):
        probs = LG.sample_labels(vae_path, ldm_path, cond, seed=FIT_SEED, device=device, progress=False,
                                 batch_size=n_requests, calibration=calibration,
                                 sampling={**samp, "compose_weight": weights})
        return [schema.lesion_counts(lab) for lab in probs.argmax(1)]

    weights = {t: 1.0 for t in types}
    record = {"compose_weight": None, "requests": int(n_requests), "seed": FIT_SEED, "types": {}}
    for j, t in enumerate(types):
        alone = np.zeros_like(requests)
        alone[:, j] = requests[:, j]
        target = float(np.median([c[t] for c in volumes(alone, weights)]))
        if target == 0:
            log.info("compose weight of %s: the model draws no %s for it alone on these requests; kept at 1", t, t)
            record["types"][t] = {"alone_median_voxels": 0.0, "tried": [], "weight": 1.0}
            continue

        def composed(k, t=t):
            return float(np.median([c[t] for c in volumes(requests, {**weights, t: k})]))

        weights[t], trace = search_weight(composed, target)
        record["types"][t] = {"alone_median_voxels": target, "weight": round(weights[t], 4),
                              "tried": [{"weight": round(k, 4), "median_voxels": v} for k, v in trace]}
        log.info("compose weight of %s: %.3f (alone: median %.1f voxels; composed at %s)", t, weights[t], target,
                 ", ".join(f"{k:.3g}: {v:.1f}" for k, v in trace))
    record["compose_weight"] = {t: round(k, 4) for t, k in weights.items()}
    save_json(record, out_path)
    return record

