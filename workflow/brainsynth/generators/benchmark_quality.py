"""The quality table of one generator's samples, on one protocol for every generator.

The generator benchmark scores each generator's main-set samples with the measures of the
synthesis audit, so generators that share label maps (brainspade, gmm, spade_diffusion) and
those that do not (lesion_insertion) are read side by side:

- ``ms_ssim`` per modality: mean pairwise MS-SSIM among the synthetic images beside the same
  among the real training images (lower = more diverse);
- ``cohens_d`` per tissue: Cohen's d of the synthetic tissue fractions against the training
  subjects' (anatomical plausibility of regional volumes), and ``mean_abs_cohens_d`` over them;
- ``conditioning_adherence``: share of samples holding every requested lesion type and no other
  (the missed-conditioning flag of ``label_quality.synthetic_sample_qc``);
- ``tissue_out_of_range``: share with a tissue fraction outside the widened training range;
- ``nearest_training_dice``: mean Dice of each sample to its nearest training map, beside the
  held-out real subjects' figure (the memorisation baseline), and ``closer_than_held_out``: share
  of samples closer to a training map than any held-out subject.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from . import common as C
from .label_quality import _hard_maps, sample_qc_of_maps, tissue_fraction_check
from .quality import DEFAULTS as QUALITY_DEFAULTS
from .quality import ms_ssim_diversity

COLUMNS = ["measure", "item", "synthetic", "real", "n_synthetic", "n_real"]


def conditioning_table(manifest, schema):
    """``subject, conditioning_mode, dc_<type>`` from a sampling manifest: brainSPADE's carries the
    dc values it was conditioned on; lesion insertion's the voxels it was asked to insert per class
    (summed per lesion type: what matters is whether a type was requested)."""
    manifest = manifest.copy()
    manifest["subject"] = manifest["subject"].astype(str)
    if "conditioning_mode" not in manifest.columns:
        raise InputError("the manifest has no conditioning_mode column", field="manifest.tsv",
                         fix="rerun the generator's sampling rule")
    dc = [c for c in manifest.columns if c.startswith("dc_")]
    if dc:
        return manifest[["subject", "conditioning_mode", *dc]]
    out = manifest[["subject", "conditioning_mode"]].copy()
    for t, classes in schema.lesion_types.items():
        cols = [f"requested_{c}" for c in classes]
        missing = [c for c in cols if c not in manifest.columns]
        if missing:
            raise InputError(f"the manifest has neither dc_<type> nor {missing}", field="manifest.tsv",
                             fix="rerun the generator's sampling rule")
        out[f"dc_{t}"] = manifest[cols].sum(axis=1).astype(float)
    return out


def _images(paths):
    return np.stack([C.load_image(p) for p in paths])


def generator_quality(samples, conditioning, training, held_out, modalities, schema, *, max_pairs=None, seed=0):
    """Long table (:data:`COLUMNS`) of the measures in the module docstring.

    ``samples``: ``{sample: {"label": hard map path, <modality>: image path}}``;
    ``conditioning``: :func:`conditioning_table` rows for those samples; ``training``:
    ``{subject: {"labelprob": path, <modality>: path}}`` (the generators' training subjects);
    ``held_out``: ``{subject: labelprob path}``; ``modalities``: those to score images in.
    """
    if len(samples) < 2 or len(training) < 2:
        raise InputError(f"{len(samples)} samples and {len(training)} training subjects: MS-SSIM and Cohen's d "
                         "need at least 2 of each", field="synthesis.n_samples", fix="sample at least 2 subjects")
    max_pairs = QUALITY_DEFAULTS["max_pairs"] if max_pairs is None else max_pairs
    ids = list(samples)
    rows = []
    for m in modalities:
        syn = ms_ssim_diversity(_images([samples[s][m] for s in ids]), max_pairs=max_pairs, seed=seed)
        real = ms_ssim_diversity(_images([training[s][m] for s in training]), max_pairs=max_pairs, seed=seed)
        rows.append({"measure": "ms_ssim", "item": m, "synthetic": syn["ms_ssim_mean"], "real": real["ms_ssim_mean"],
                     "n_synthetic": syn["n_pairs"], "n_real": real["n_pairs"]})
    manifest = conditioning.set_index("subject").loc[ids].reset_index()
    hard = np.stack([C.load_image(samples[s]["label"]).round().astype(np.uint8) for s in ids])
    real_maps = _hard_maps([spec["labelprob"] for spec in training.values()], schema.n_classes)
    held = _hard_maps(list(held_out.values()), schema.n_classes) if held_out else None
    qc, fr_real, near_held = sample_qc_of_maps(manifest, hard, real_maps, held, schema)
    syn_fr = qc[[f"fraction_{t}" for t in schema.tissues]].rename(columns=lambda c: c[len("fraction_"):])
    fractions = tissue_fraction_check(syn_fr, fr_real, schema.tissues)
    n_syn, n_real = len(ids), len(training)
    for r in fractions.itertuples():
        rows.append({"measure": "cohens_d", "item": r.tissue, "synthetic": r.cohens_d, "real": 0.0,
                     "n_synthetic": n_syn, "n_real": n_real})
    rows.append({"measure": "mean_abs_cohens_d", "item": "tissues", "synthetic": float(np.nanmean(
        np.abs(fractions["cohens_d"]))), "real": 0.0, "n_synthetic": n_syn, "n_real": n_real})
    rows.append({"measure": "conditioning_adherence", "item": "all", "synthetic": float(1 - qc["missed_conditioning"].mean()),
                 "real": np.nan, "n_synthetic": n_syn, "n_real": 0})
    rows.append({"measure": "tissue_out_of_range", "item": "all", "synthetic": float(qc["tissue_out_of_range"].mean()),
                 "real": np.nan, "n_synthetic": n_syn, "n_real": 0})
    rows.append({"measure": "nearest_training_dice", "item": "mean", "synthetic": float(qc["nearest_training_dice"].mean()),
                 "real": float(near_held.mean()) if len(near_held) else np.nan, "n_synthetic": n_syn,
                 "n_real": len(near_held)})
    rows.append({"measure": "closer_than_held_out", "item": "share", "synthetic": float(qc["near_copy"].mean()),
                 "real": np.nan, "n_synthetic": n_syn, "n_real": len(near_held)})
    return pd.DataFrame(rows, columns=COLUMNS)
