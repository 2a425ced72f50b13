"""The calibration sampling decodes with, fitted per trained label generator (rule
``fit_label_sampling``): the VAE's class offsets (``calibrate_label_vae``), plus the tissue offsets
of :mod:`.tissue_fit` (``sampling.tissue_offsets: fit``) and the size of the random deformation of
:mod:`.deformation` (``sampling.deformation: fit``). Both are fitted on maps drawn at the training
maps' own conditioning, against the training maps, never against held-out ones.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import torch

from ...errors import InputError
from ...io import save_json
from ...labels import LabelSchema
from .. import common as C
from . import deformation as D
from . import label_generator as LG
from .tissue_fit import brain_fractions, fit_tissue_offsets

log = logging.getLogger(__name__)

#: seed of the fit's noise and fields: apart from the audit's (0) and the sample sets' seeds
FIT_SEED = 11
#: maps the fit draws at most (at the conditioning of as many training maps, drawn with the seed):
#: enough for a mean fraction and a pairwise Dice, and a bounded cost on a large cohort
FIT_MAX_MAPS = 64
#: maps drawn at each training map's conditioning for the deformation's fit, where the cap leaves
#: room: a pairwise Dice within a phenotype of ten maps is noisier than a mean fraction (the tissue
#: offsets alone draw one)
DRAWS_PER_MAP = 2
#: the deformation changes the tissue fractions a little and the offsets the pairwise Dice: each
#: is fitted again on the other's result this many times
ALTERNATIONS = 2


def fit_sampling_calibration(vae_path, ldm_path, calibration, training_maps, out_path, *, tissue_offsets=True,
                             deformation=False, sampling=None, schema=None, device="auto", num_threads=None,
                             seed=FIT_SEED):
    """Sample maps at the training maps' conditioning (one each, ``DRAWS_PER_MAP`` where the
    deformation is fitted, at most ``FIT_MAX_MAPS`` in all), fit the deformation's size (against the
    training maps' pairwise Dice within each phenotype) and the tissue offsets (against their mean
    tissue fractions), and write the calibration sampling decodes with: the VAE's class offsets
    (``calibration``, its JSON) plus the tissue offsets, its temperature, the deformation, and
    beside them what each fit started from and reached."""
    C.set_threads(num_threads)
    schema = schema or LabelSchema()
    base, temperature = LG.load_calibration(calibration, schema.n_classes)
    base = torch.zeros(schema.n_classes) if base is None else base
    truth = np.stack([C.load_prob_label(p, schema.n_classes).argmax(0).astype(np.uint8) for p in training_maps])
    voxel_mm = [round(float(z), 6) for z in nib.load(str(training_maps[0])).header.get_zooms()[:3]]
    tissues = {schema.value(t): t for t in schema.tissues}
    target = brain_fractions(truth, tissues)
    types, train_values = LG.training_conditioning(ldm_path)
    if len(train_values) != len(truth):
        raise InputError(f"{len(truth)} training maps given for an LDM trained on {len(train_values)}",
                         field="training_maps", fix="give the maps the LDM was trained on, in its order")
    # each training map's phenotype by its conditioning row (the maps come in the LDM's order),
    # as the maps drawn at those rows
    phenotypes = D.conditioning_phenotypes(train_values, types)
    keep = np.arange(len(truth))
    if len(keep) > FIT_MAX_MAPS:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), FIT_MAX_MAPS, replace=False))
    if deformation:
        keep = np.repeat(keep, max(1, min(DRAWS_PER_MAP, FIT_MAX_MAPS // len(keep))))
    train_values = np.asarray(train_values, np.float32)[keep]
    # log-probabilities times the temperature: the logits less a per-voxel constant, and so is
    # any warp of them (each voxel takes one voxel's values): the argmaxes sampling takes
    logits = torch.from_numpy(LG.sample_labels(vae_path, ldm_path, train_values, seed=seed, device=device,
                                               progress=False, batch_size=4, calibration=calibration,
                                               sampling=sampling, log_probs=True)) * temperature
    # the maps as the samples carry them: lesion types their request leaves at 0 removed
    logits = LG.remove_unrequested_logits(logits, train_values, types, schema,
                                          LG.sampling_config(ldm_path, sampling)["unrequested_lesions"])
    offsets = torch.zeros(schema.n_classes)
    record = {"temperature": temperature, "vae_class_offsets": [round(float(b), 6) for b in base]}
    stds, drawn = {}, logits
    if deformation:
        groups = [phenotypes[i] for i in keep]
        # a phenotype with fewer than two maps, drawn or in training, has no pairwise Dice on that
        # side; where no phenotype has two on both, all maps form one group: the drawn maps follow
        # the training maps' conditioning, so the pooled figures still compare like with like
        fitted = {g for g in groups if groups.count(g) > 1 and phenotypes.count(g) > 1}
        grouping = "phenotype" if fitted else "pooled"
        if not fitted:
            groups, phenotypes = ["all"] * len(groups), ["all"] * len(phenotypes)
            fitted = {"all"}
        members = {g: [i for i, x in enumerate(groups) if x == g] for g in sorted(fitted)}
        targets = {g: D.mean_pairwise_dice(truth[[i for i, x in enumerate(phenotypes) if x == g]],
                                           [g] * phenotypes.count(g), schema.n_classes) for g in members}
        diversity = float(np.mean(list(targets.values())))  # the training maps' figure over phenotypes
    for _ in range(ALTERNATIONS if deformation and tissue_offsets else 1):
        if deformation:
            # one size per phenotype, each against the training maps of its own: the LDM keeps
            # some phenotypes more alike than others (the demo's healthy maps most)
            stds = {g: D.fit_deformation(logits[idx], targets[g], [g] * len(idx), voxel_mm, seed, offsets,
                                         indices=idx)["std_mm"] for g, idx in members.items()}
            # a phenotype not fitted (one map drawn or in training, or none of the training maps':
            # several lesion types at once) has no diversity to match and is not warped; pooled,
            # every map takes the one size
            stds[None] = stds["all"] if grouping == "pooled" else 0.0
            drawn = D.deform(logits, D.map_stds(stds, groups), voxel_mm, seed)
        if tissue_offsets:
            fit = fit_tissue_offsets(drawn, target)
            offsets = fit["offsets"]
    record["class_offsets"] = [round(float(b) + float(o), 6) for b, o in zip(base, offsets)]
    notes = []
    if deformation:
        in_fit = [g if g in fitted else None for g in groups]
        after = D.mean_pairwise_dice(LG.with_class_offsets(drawn, offsets).argmax(1).numpy(), in_fit,
                                     schema.n_classes)
        undeformed = D.mean_pairwise_dice(LG.with_class_offsets(logits, offsets).argmax(1).numpy(), in_fit,
                                          schema.n_classes)
        by_phenotype = {g: round(v, 4) for g, v in stds.items() if g is not None} if grouping == "phenotype" else {}
        record["deformation"] = {"std_mm": round(stds[None], 4), "std_mm_by_phenotype": by_phenotype,
                                 "spacing_mm": D.CONTROL_SPACING_MM,
                                 "interpolation": D.INTERPOLATION, "voxel_mm": voxel_mm,
                                 "pairwise_dice_training": round(diversity, 6),
                                 "pairwise_dice_before": round(undeformed, 6),
                                 "pairwise_dice_after": round(after, 6), "maps": len(train_values),
                                 "training_maps": len(truth), "grouping": grouping, "seed": int(seed)}
        within = "within phenotypes" if grouping == "phenotype" else "pooled (no phenotype with two maps on both sides)"
        sizes = (", ".join(f"{g} {v:.2f} mm" for g, v in by_phenotype.items()) + ", other phenotypes none"
                 if by_phenotype else f"{stds[None]:.2f} mm")
        notes.append(f"deformation {sizes} (pairwise Dice {within} {undeformed:.3f} -> {after:.3f}, "
                     f"training maps {diversity:.3f})")
    if tissue_offsets:
        before, after = fit["before"], fit["after"]
        record["tissue_offsets"] = {tissues[c]: round(float(offsets[c]), 6) for c in tissues}
        record["tissue_fit"] = {"maps": len(train_values), "seed": int(seed), "round": fit["round"],
                                **{f"{tissues[c]}_training": round(target[c], 6) for c in tissues},
                                **{f"{tissues[c]}_before": round(before[c], 6) for c in tissues},
                                **{f"{tissues[c]}_after": round(after[c], 6) for c in tissues}}
        relative = {c: (f"{before[c] / target[c] - 1:+.1%} -> {after[c] / target[c] - 1:+.1%}" if target[c] else
                        "absent from the training maps, not fitted") for c in tissues}
        notes.append(f"tissue offsets at sampling (round {fit['round']}): "
                     + ", ".join(f"{tissues[c]} {offsets[c]:+.3f}" for c in tissues)
                     + "; drawn vs training before -> after: " + ", ".join(f"{tissues[c]} {relative[c]}"
                                                                           for c in tissues))
    save_json(record, out_path)
    log.info("label sampling fitted on %d maps drawn at the conditioning of %d training maps: %s", len(train_values),
             len(truth), "; ".join(notes))
    return record
