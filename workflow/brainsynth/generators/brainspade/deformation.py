"""A random smooth deformation of each sampled label map, its size fitted per trained label
generator (``label_generator.sampling.deformation: fit``, rule ``fit_label_sampling``).

The LDM's samples sit nearer the mean brain than its training maps do: on the demo 50 healthy
samples have a mean pairwise Dice of 0.86 against the healthy training maps' 0.76, and no sampling
setting, capacity or budget measured moved it (README, "Diversity like for like"). Anatomy varies
between subjects mostly by where its boundaries lie, so, as SynthSeg does with its training labels,
each sampled map is warped by its own random smooth displacement field (Gaussian values on control
points ``CONTROL_SPACING_MM`` apart, interpolated linearly); its standard deviation is fitted per
phenotype so that maps drawn at the training maps' conditioning are as alike as the training maps
of that phenotype (a phenotype without two training maps of its own, such as several lesion types
at once, has no diversity to match and is not warped). The warp acts on the decoder's
log-probabilities, before the argmax, so the decoder's class offsets move the same argmaxes with and
without it, and it takes each voxel's value from the nearest voxel, as SynthSeg warps its label
maps: interpolated linearly, a structure one voxel thin (the demo's CSF rim at 4 mm, a small WMH)
fades under its neighbours and is lost to the argmax. It gives the samples spread, not the LDM; on
the demo (its setting there) it meets the diversity gate of every phenotype with no segmentation arm
moving beyond the spread of single trainings (README, "A deformation of each sample").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputError
from .. import common as C

#: spacing of the field's control points: displacements vary over a few centimetres, as the
#: position of a gyrus or a ventricle does between subjects
CONTROL_SPACING_MM = 24.0
#: the fit's search range of the standard deviation (mm) and its number of bisections
FIT_MAX_MM = 8.0
FIT_BISECTIONS = 10
#: the fields' random stream, apart from the sampler's noise
FIELD_STREAM = 0xDEF
#: how the warp reads the maps (the calibration records it: a fit made with another is refused)
INTERPOLATION = "nearest"
#: pairs of maps a phenotype at most in the pairwise Dice (the audit's figure too)
MAX_PAIRS = 300


def phenotype(lesion_present):
    """A map's phenotype from the lesion types it holds (``{type: bool}``): ``healthy`` or the
    types joined by ``+``."""
    held = [t for t, on in lesion_present.items() if on]
    return "+".join(held) if held else "healthy"


def conditioning_phenotypes(conditioning, lesion_types):
    """The phenotype each row of a conditioning ``(N, n_types)`` asks for."""
    return [phenotype({t: float(v) > 0 for t, v in zip(lesion_types, row)}) for row in np.asarray(conditioning)]


def unit_field(shape, voxel_mm, seed, index, spacing_mm=CONTROL_SPACING_MM):
    """Displacement ``(D, *shape)`` in voxels of map ``index`` drawn at ``seed`` for a standard
    deviation of 1 mm: one generator per ``(seed, index)``, so a map's field depends on neither
    the batch nor how many maps are drawn, and a field of ``s`` mm is ``s`` times this one."""
    shape = tuple(int(s) for s in shape)
    voxel_mm = np.broadcast_to(np.asarray(voxel_mm, dtype=np.float64), (len(shape),)).copy()
    n = [max(2, int(np.ceil(s * v / spacing_mm)) + 1) for s, v in zip(shape, voxel_mm)]
    # a stream of its own: seeds derived as the sampler's noise seeds are would share its values
    g = C.generator(int(np.random.SeedSequence([int(seed), int(index), FIELD_STREAM]).generate_state(1)[0]))
    ctrl = torch.randn((1, len(shape), *n), generator=g, dtype=torch.float32)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    disp = F.interpolate(ctrl, size=shape, mode=mode, align_corners=True)[0]
    return disp / torch.as_tensor(voxel_mm, dtype=torch.float32).view(-1, *([1] * len(shape)))


def warp(maps, displacement):
    """``maps`` ``(K, *shape)`` sampled at each voxel plus ``displacement`` ``(D, *shape)``
    (voxels): the value of the nearest voxel, the border's beyond the grid."""
    shape = maps.shape[1:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    pos = idx + displacement
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape]).view(-1, *([1] * len(shape)))
    grid = (pos * scale - 1).flip(0)  # grid_sample takes (x, y[, z]) = the last axis first
    grid = grid.permute(*range(1, len(shape) + 1), 0)[None]
    return F.grid_sample(maps[None].float(), grid, mode=INTERPOLATION, padding_mode="border", align_corners=True)[0]


def deform(maps, std_mm, voxel_mm, seed, first_index=0):
    """Each of ``maps`` ``(N, K, *shape)`` warped by its own field (:func:`unit_field` of index
    ``first_index + i``) of standard deviation ``std_mm`` (one for all maps or one per map); a map
    of 0 unchanged."""
    stds = np.broadcast_to(np.asarray(std_mm, dtype=np.float64), (len(maps),))
    if not stds.any():
        return maps
    return torch.stack([warp(m, float(s) * unit_field(m.shape[1:], voxel_mm, seed, first_index + i)) if s else m
                        for i, (m, s) in enumerate(zip(maps, stds))])


def load_deformation(record):
    """``(stds, voxel_mm)`` of a sampling calibration's record (its JSON as a dict), ``stds``
    ``{phenotype: std_mm}`` plus ``None``: the size of phenotypes it has none for; ``None`` where
    it has no deformation."""
    d = (record or {}).get("deformation")
    by_phenotype = {str(k): float(v) for k, v in (d or {}).get("std_mm_by_phenotype", {}).items()}
    if not d or not (float(d.get("std_mm", 0)) or any(by_phenotype.values())):
        return None
    if (min([float(d["std_mm"]), *by_phenotype.values()]) < 0
            or float(d.get("spacing_mm", CONTROL_SPACING_MM)) != CONTROL_SPACING_MM
            or d.get("interpolation", "linear") != INTERPOLATION):
        raise InputError(f"the sampling calibration's deformation {d} is not one this version draws",
                         field="deformation", fix="rerun the rule fit_label_sampling")
    return {**by_phenotype, None: float(d["std_mm"])}, [float(v) for v in d["voxel_mm"]]


def map_stds(stds, phenotypes):
    """The standard deviation of each map's field from its phenotype (:func:`load_deformation`'s
    ``stds``; a phenotype it lacks takes the size under ``None``)."""
    return np.array([stds.get(p, stds[None]) for p in phenotypes], dtype=np.float64)


def mean_pairwise_dice(hard, groups, n_classes, max_pairs=MAX_PAIRS, seed=0):
    """Mean over groups (of two or more maps; a group named ``None`` left out) of the audit's
    pairwise Dice of their maps (:func:`label_quality.pairwise_dice`, at most ``max_pairs`` pairs
    a group, drawn with ``seed``)."""
    from ..label_quality import pairwise_dice  # the audit's definition; it imports this package lazily too

    hard = np.asarray(hard)
    groups = np.asarray(groups, dtype=object)
    per_group = [pairwise_dice(hard[groups == g], n_classes, max_pairs, seed)[0]
                 for g in sorted({x for x in groups if x is not None}) if (groups == g).sum() > 1]
    if not per_group:
        raise InputError("the deformation fit needs two or more maps of one phenotype",
                         field="label_generator.sampling.deformation", fix="use deformation: none")
    return float(np.mean(per_group))


def fit_deformation(logits, target, groups, voxel_mm, seed, offsets=None, max_mm=FIT_MAX_MM,
                    bisections=FIT_BISECTIONS, indices=None):
    """The standard deviation (mm) at which the maps ``logits`` ``(N, K, *shape)`` (plus
    ``offsets``), each warped by its field (:func:`unit_field` of its index in ``indices``,
    default ``0..N-1``, at ``seed``), have the mean pairwise Dice ``target`` within their
    ``groups`` (bisection in ``[0, max_mm]``; the Dice falls as the fields grow). 0 where they are
    already that diverse; ``max_mm`` where even that is too little.
    -> ``{"std_mm", "before", "after"}`` (the pairwise Dice without and with the warp)."""
    n_classes = logits.shape[1]
    indices = range(len(logits)) if indices is None else indices
    unit = [unit_field(m.shape[1:], voxel_mm, seed, i) for i, m in zip(indices, logits)]
    shifted = logits if offsets is None else logits + offsets.view(1, -1, *([1] * (logits.ndim - 2)))

    def dice(std):
        hard = torch.stack([warp(m, std * u).argmax(0) if std else m.argmax(0) for m, u in zip(shifted, unit)])
        return mean_pairwise_dice(hard.numpy(), groups, n_classes)

    before = dice(0.0)
    if before <= target:
        return {"std_mm": 0.0, "before": before, "after": before}
    lo, hi = 0.0, float(max_mm)
    if dice(hi) > target:
        return {"std_mm": hi, "before": before, "after": dice(hi)}
    for _ in range(int(bisections)):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dice(mid) > target else (lo, mid)
    return {"std_mm": hi, "before": before, "after": dice(hi)}
