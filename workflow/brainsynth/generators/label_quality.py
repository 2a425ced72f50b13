"""Fidelity of synthetic label maps: autoencoder reconstruction, conditioning adherence,
diversity, lesion placement and per-sample QC.

Why a module of its own: the label generator is judged in two stages (is the autoencoder's
latent space able to hold the anatomy and the lesions at all, then does the diffusion model
sample from it what it was asked for), and every figure here is computed on hard label maps
(argmax) with plain numpy so that tests can check them against hand-computed cases.

Public API
----------
``dice_per_class(reference, prediction, classes) -> dict``
    Dice of each class value; ``nan`` when the class is absent from both maps.
``reconstruction_rows(reference, reconstruction, names, subject, split) -> list of dict``
    per class: Dice, voxels in / out and their ratio.
``reconstruction_gate(rows, schema, thresholds) -> DataFrame``
    per class: mean held-out Dice against its threshold, and the healthy-subject check
    (no lesion voxels created where none were given).
``lesion_volumes(hard, schema) -> DataFrame``
    per map: voxels of each lesion type.
``conditioning_adherence(volumes, conditioning, min_voxels) -> (summary, per_sample)``
    per conditioning mode: share of samples with the requested lesion types present and
    with unrequested ones absent; Spearman correlation of requested dc and volume. The audit
    takes it on the decoded maps, before ``sampling.unrequested_lesions`` removes lesion types
    a request did not ask for (it judges the networks), and every other figure on the maps as
    the samples carry them.
``pairwise_dice(hard, n_classes, max_pairs, seed) -> (mean, std, n_pairs)``
    mean over pairs of the mean non-background Dice: diversity (lower = more diverse).
``pairwise_dice_by_phenotype(...) -> DataFrame``
    the same like for like: each conditioning mode's samples beside the training maps of its
    lesion phenotype; the audit's gated diversity measure.
``lesion_centroid_spread(hard, schema, voxel_mm) -> dict``
    per lesion type: RMS distance (mm) of the maps' lesion centroids from their mean.
``tissue_fraction_check(synthetic, training, tissues, tolerance) -> DataFrame``
    tissue volume fraction of the brain per class: synthetic mean vs training mean, and
    ``cohens_d(a, b)`` of the two sets (anatomical plausibility per structure).
``tissue_fraction_check_by_phenotype(...) -> DataFrame``
    the same, like for like: each conditioning mode against the training maps of its lesion
    phenotype (``lesion_phenotypes``); the audit's gated tissue measure.
FID and improved precision/recall (``brainsynth.feature_metrics``) on :func:`label_features`
    (the workflow's own label VAE encoder: an in-domain extractor that needs no download).
``sample_flags(...) -> DataFrame``
    per synthetic sample: missed conditioning, tissue outside the training range, near copy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..errors import InputError
from ..feature_metrics import against_reference
from ..labels import single_type_modes

# Issue gate of the label autoencoder (held-out Dice after argmax).
RECONSTRUCTION_THRESHOLDS = {"csf": 0.90, "gm": 0.90, "wm": 0.90, "deep_gm": 0.80, "brainstem": 0.80,
                             "lesion": 0.70}


def dice_per_class(reference, prediction, classes):
    """``{class value: Dice}`` of two hard maps; ``nan`` where both are empty."""
    ref = np.asarray(reference)
    pred = np.asarray(prediction)
    if ref.shape != pred.shape:
        raise InputError(f"maps of shapes {ref.shape} and {pred.shape} cannot be compared")
    out = {}
    for c in classes:
        a, b = ref == c, pred == c
        s = int(a.sum()) + int(b.sum())
        out[int(c)] = 2.0 * int((a & b).sum()) / s if s else float("nan")
    return out


def mean_label_dice(a, b, n_classes):
    """Mean Dice of the non-background classes present in either map; 1 when neither has any.
    Counted from the maps' joint histogram, one pass over the voxels (values outside
    ``1 .. n_classes - 1`` count as background, as in :func:`dice_per_class`): the audit's
    pairwise and nearest-map figures and the deformation fit call it for hundreds of pairs."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    k = int(n_classes)
    a = np.where((a > 0) & (a < k), a, 0).astype(np.int64).ravel()
    b = np.where((b > 0) & (b < k), b, 0).astype(np.int64).ravel()
    joint = np.bincount(a * k + b, minlength=k * k).reshape(k, k)
    inter = np.diag(joint)[1:]
    total = (joint.sum(1) + joint.sum(0))[1:]
    d = [2.0 * int(i) / int(t) for i, t in zip(inter, total) if t]
    return float(np.mean(d)) if d else 1.0


def reconstruction_rows(reference, reconstruction, names, subject, split):
    """One row per non-background class: Dice, voxels in and out, out/in ratio."""
    ref = np.asarray(reference)
    rec = np.asarray(reconstruction)
    dice = dice_per_class(ref, rec, range(1, len(names)))
    rows = []
    for c in range(1, len(names)):
        n_in, n_out = int((ref == c).sum()), int((rec == c).sum())
        rows.append({"subject": subject, "split": split, "class": names[c], "dice": dice[c],
                     "voxels_in": n_in, "voxels_out": n_out,
                     "volume_ratio": n_out / n_in if n_in else float("nan")})
    return rows


def reconstruction_gate(rows, schema, thresholds=None, split="held_out"):
    """Per class: mean ``split`` Dice over the subjects that have the class, its threshold and
    whether it passes; lesion classes also ``created_in_healthy`` (voxels of the class decoded
    in subjects without any lesion; must be 0)."""
    th = dict(RECONSTRUCTION_THRESHOLDS, **(thresholds or {}))
    df = pd.DataFrame(rows)
    part = df[df["split"] == split]
    if part.empty:
        part = df
    lesion_classes = set(schema.lesion_classes)
    lesion_voxels = part[part["class"].isin(lesion_classes)].groupby("subject")["voxels_in"].sum()
    healthy_ids = set(lesion_voxels[lesion_voxels == 0].index)
    out = []
    for name in schema.names[1:]:
        g = part[part["class"] == name]
        present = g[g["voxels_in"] > 0]
        is_lesion = name in lesion_classes
        threshold = th["lesion"] if is_lesion else th.get(name)
        created = int(g.loc[g["subject"].isin(healthy_ids), "voxels_out"].sum()) if is_lesion else 0
        mean = float(present["dice"].mean()) if len(present) else float("nan")
        ok = (threshold is None or not len(present) or mean >= threshold) and created == 0
        out.append({"class": name, "split": split, "n_subjects_with_class": len(present), "dice_mean": mean,
                    "dice_min": float(present["dice"].min()) if len(present) else float("nan"),
                    "volume_ratio": float(present["voxels_out"].sum() / max(1, present["voxels_in"].sum()))
                    if len(present) else float("nan"),
                    "threshold": threshold, "created_in_healthy": created,
                    "n_healthy_subjects": len(healthy_ids) if is_lesion else 0, "pass": bool(ok)})
    return pd.DataFrame(out)


def lesion_volumes(hard, schema, ids=None):
    """Voxels of each lesion type per hard map ``(N, *spatial)``."""
    hard = np.asarray(hard)
    rows = []
    for i, lab in enumerate(hard):
        counts = schema.lesion_counts(lab)
        rows.append({"sample": ids[i] if ids is not None else i, **{f"voxels_{t}": int(v) for t, v in counts.items()}})
    return pd.DataFrame(rows)


def spearman(x, y):
    """Spearman rank correlation (average ranks for ties); ``nan`` when either is constant."""
    x = pd.Series(np.asarray(x, dtype=float))
    y = pd.Series(np.asarray(y, dtype=float))
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(x.rank().to_numpy(), y.rank().to_numpy())[0, 1])


def conditioning_adherence(volumes, conditioning, min_voxels=5):
    """Conditioning adherence of sampled label maps.

    ``volumes``: :func:`lesion_volumes` rows; ``conditioning``: same rows, columns ``mode``
    and ``dc_<type>``. A lesion type counts as present with more than ``min_voxels`` voxels.
    Returns ``(summary, per_sample)``: summary rows ``(mode, measure, lesion_type, value, n)``
    with measures ``requested_present`` (share of samples holding every requested type),
    ``any_lesion`` (share with any lesion, for ``healthy``), ``unrequested_absent`` and
    ``spearman`` (requested dc vs generated voxels, over the samples that request the type,
    mode ``all_requested``).
    """
    types = [c[3:] for c in conditioning.columns if c.startswith("dc_")]
    if len(volumes) != len(conditioning):
        raise InputError(f"{len(volumes)} volume rows for {len(conditioning)} conditioning rows")
    per = conditioning.reset_index(drop=True).copy()
    for t in types:
        per[f"voxels_{t}"] = volumes[f"voxels_{t}"].to_numpy()
        per[f"present_{t}"] = per[f"voxels_{t}"] > min_voxels
        per[f"requested_{t}"] = per[f"dc_{t}"] > 0
    req = per[[f"requested_{t}" for t in types]].to_numpy()
    pres = per[[f"present_{t}" for t in types]].to_numpy()
    per["requested_present"] = np.where(req, pres, True).all(1)
    per["unrequested_absent"] = np.where(~req, ~pres, True).all(1)
    per["any_lesion"] = pres.any(1)
    rows = []
    for mode, g in per.groupby("mode", sort=False):
        n = len(g)
        if g[[f"requested_{t}" for t in types]].to_numpy().any():
            rows.append({"mode": mode, "measure": "requested_present", "lesion_type": "all",
                         "value": float(g["requested_present"].mean()), "n": n})
            for t in types:
                gt = g[g[f"requested_{t}"]]
                if len(gt):
                    rows.append({"mode": mode, "measure": "requested_present", "lesion_type": t,
                                 "value": float(gt[f"present_{t}"].mean()), "n": len(gt)})
        else:
            rows.append({"mode": mode, "measure": "any_lesion", "lesion_type": "all",
                         "value": float(g["any_lesion"].mean()), "n": n})
        rows.append({"mode": mode, "measure": "unrequested_absent", "lesion_type": "all",
                     "value": float(g["unrequested_absent"].mean()), "n": n})
    for t in types:
        g = per[per[f"requested_{t}"]]
        rows.append({"mode": "all_requested", "measure": "spearman", "lesion_type": t,
                     "value": spearman(g[f"dc_{t}"], g[f"voxels_{t}"]), "n": len(g)})
    return pd.DataFrame(rows), per


def _volumes_holding(training_volumes, lesion_type):
    """Voxel counts of the training maps that hold ``lesion_type`` (the reference of its size)."""
    v = training_volumes[f"voxels_{lesion_type}"].astype(float)
    return v[v > 0]


def lesion_volume_ratios(per_sample, training_volumes, lesion_types):
    """Per lesion type, ``(ratio, n_samples, n_training)``: median volume of the samples asking for
    that type alone (mode ``<type>_only``, dc drawn from the training maps holding it) over the
    median volume of the training maps holding it. 1: lesions of training size; guidance can
    follow dc in rank (Spearman) and still draw every lesion at several times its size."""
    out = {}
    for t in lesion_types:
        syn = per_sample.loc[per_sample["mode"] == single_type_modes([t])[0], f"voxels_{t}"]
        real = _volumes_holding(training_volumes, t)
        ratio = float(syn.median() / real.median()) if len(syn) and len(real) else float("nan")
        out[t] = (ratio, len(syn), len(real))
    return out


def pairwise_dice(hard, n_classes, max_pairs=None, seed=0):
    """Mean (std, number) over pairs of maps of their mean non-background class Dice."""
    hard = np.asarray(hard)
    pairs = list(itertools.combinations(range(len(hard)), 2))
    if not pairs:
        raise InputError("pairwise Dice needs at least 2 maps")
    if max_pairs and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=int(max_pairs), replace=False))]
    vals = [mean_label_dice(hard[i], hard[j], n_classes) for i, j in pairs]
    return float(np.mean(vals)), float(np.std(vals)), len(pairs)


def lesion_centroid_spread(hard, schema, voxel_mm=1.0):
    """Per lesion type: number of maps with it and RMS distance (mm) of their lesion centroids
    from the mean centroid; where a generator puts lesions (one place for all = 0)."""
    hard = np.asarray(hard)
    out = {}
    for t in schema.lesion_types:
        cents = []
        for lab in hard:
            pos = np.argwhere(schema.lesion_type_mask(lab, t))
            if len(pos):
                cents.append(pos.mean(0) * float(voxel_mm))
        if len(cents) >= 2:
            c = np.stack(cents)
            spread = float(np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()))
        else:
            spread = float("nan")
        out[t] = {"n_with_lesion": len(cents), "centroid_spread_mm": spread}
    return out


def label_features(vae_path, hard, n_classes, device="cpu", batch=8):
    """In-domain features of hard label maps from the workflow's own label VAE encoder: mean and
    standard deviation over space of each latent channel of the one-hot map's posterior mean
    (2 x latent channels values per map). Offline and trained on the cohort itself."""
    import torch

    from . import common as C
    from .brainspade.label_generator import load_vae

    vae, pay = load_vae(vae_path, device)
    out = []
    with torch.no_grad():
        for i in range(0, len(hard), batch):
            x = torch.from_numpy(np.eye(n_classes, dtype=np.float32)[np.asarray(hard[i:i + batch], dtype=np.int64)])
            x = torch.movedim(x, -1, 1)
            mu, _ = vae.encode(C.pad_background(x, pay["padded_shape"]).to(device))
            flat = mu.float().flatten(2)
            out.append(torch.cat([flat.mean(2), flat.std(2)], 1).cpu().numpy())
    return np.concatenate(out)


def tissue_fractions(hard, schema):
    """Per map: each tissue class's share of the brain (non-background) voxels, lesions in the
    brain count, so healthy and lesioned maps are comparable."""
    hard = np.asarray(hard)
    rows = []
    for lab in hard:
        brain = max(1, int((lab > 0).sum()))
        rows.append({t: float((lab == schema.value(t)).sum()) / brain for t in schema.tissues})
    return pd.DataFrame(rows)


def cohens_d(a, b):
    """Cohen's d of ``a`` against ``b``: difference of means over the pooled standard deviation
    (ddof 1); ``nan`` when both sets are constant or either has fewer than 2 values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def tissue_fraction_check(synthetic, training, tissues, tolerance=0.15):
    """Synthetic vs training mean tissue fraction; ``pass`` when within ``tolerance`` (relative)."""
    rows = []
    for t in tissues:
        s, r = float(synthetic[t].mean()), float(training[t].mean())
        rel = (s - r) / r if r > 0 else float("nan")
        rows.append({"tissue": t, "synthetic_mean": s, "training_mean": r, "training_min": float(training[t].min()),
                     "training_max": float(training[t].max()), "relative_difference": rel,
                     "cohens_d": cohens_d(synthetic[t], training[t]),
                     "pass": bool(np.isfinite(rel) and abs(rel) <= tolerance)})
    return pd.DataFrame(rows)


def lesion_phenotypes(volumes, lesion_types, min_voxels=5):
    """Each map's lesion phenotype in the audit's mode names, from the lesion types it holds (more
    than ``min_voxels``): ``healthy``, ``<type>_only``, ``unseen`` (every type at once: the audit's
    name for it, whether or not training maps hold it), else the types joined by ``+``."""
    types = list(lesion_types)
    held = {t: volumes[f"voxels_{t}"].to_numpy() > min_voxels for t in types}
    names = []
    for i in range(len(volumes)):
        present = [t for t in types if held[t][i]]
        if not present:
            names.append("healthy")
        elif len(present) == 1:
            names.append(single_type_modes(present)[0])
        else:
            names.append("unseen" if len(present) == len(types) else "+".join(present))
    return np.array(names, dtype=object)


def tissue_fraction_check_by_phenotype(synthetic, synthetic_modes, training, training_phenotypes, tissues,
                                       tolerance=0.15):
    """Synthetic vs training tissue fractions like for like: the samples of each conditioning mode
    against the training maps of the same lesion phenotype (:func:`lesion_phenotypes`), the
    training means weighted by the samples' modes. Why: tissue fractions fall with the lesion load,
    and the audit draws its modes in equal shares, a quarter with every lesion type at once, which
    the training maps may not hold at all; against the plain training mean the extra lesions would
    count as missing tissue. Modes without training maps of their phenotype are left out; ``modes``
    names those compared (none: ``nan``, not passed)."""
    syn_modes = np.asarray(synthetic_modes, dtype=object)
    tr_modes = np.asarray(training_phenotypes, dtype=object)
    matched = [m for m in pd.unique(syn_modes) if (tr_modes == m).any()]
    sel = np.isin(syn_modes, matched)
    weights = pd.Series(syn_modes[sel]).value_counts()
    rows = []
    for t in tissues:
        if matched:
            s = float(synthetic.loc[sel, t].mean())
            r = float(sum(weights[m] * training.loc[tr_modes == m, t].mean() for m in matched) / weights.sum())
        else:
            s = r = float("nan")
        rel = (s - r) / r if r > 0 else float("nan")
        rows.append({"tissue": t, "synthetic_mean": s, "training_mean": r, "relative_difference": rel,
                     "n_synthetic": int(sel.sum()), "modes": ",".join(matched),
                     "pass": bool(np.isfinite(rel) and abs(rel) <= tolerance)})
    return pd.DataFrame(rows)


def pairwise_dice_by_phenotype(synthetic, synthetic_modes, training, training_phenotypes, n_classes, *,
                               max_pairs=None, seed=0, margin=0.02):
    """Diversity like for like: per conditioning mode with two or more samples and two or more
    training maps of its phenotype (:func:`lesion_phenotypes`), the mean pairwise Dice of those
    samples beside that of those training maps; pass: not above the training figure + ``margin``.
    Why: a healthy map against a tumour map scores the tumour classes 0, so the figure pooled over
    a set that mixes phenotypes falls with the mix, not with how alike the brains are (the demo's
    pooled samples read 0.48 against the training maps' 0.52 while its healthy samples were more
    alike than its healthy training maps)."""
    syn_modes = np.asarray(synthetic_modes, dtype=object)
    tr_modes = np.asarray(training_phenotypes, dtype=object)
    syn, real = np.asarray(synthetic), np.asarray(training)
    rows = []
    for mode in pd.unique(syn_modes):
        s_sel, r_sel = syn_modes == mode, tr_modes == mode
        if s_sel.sum() < 2 or r_sel.sum() < 2:
            continue
        s = pairwise_dice(syn[s_sel], n_classes, max_pairs, seed)
        r = pairwise_dice(real[r_sel], n_classes, max_pairs, seed)
        rows.append({"mode": mode, "synthetic": s[0], "synthetic_std": s[1], "n_synthetic_pairs": s[2],
                     "training": r[0], "training_std": r[1], "n_training_pairs": r[2], "target": r[0] + margin,
                     "pass": bool(s[0] <= r[0] + margin)})
    return pd.DataFrame(rows, columns=["mode", "synthetic", "synthetic_std", "n_synthetic_pairs", "training",
                                       "training_std", "n_training_pairs", "target", "pass"])


def _widened_range(values, margin):
    """``(lo, hi)`` of ``values`` (per column of a DataFrame) widened by ``margin`` x the width each side."""
    lo, hi = values.min(), values.max()
    width = np.maximum(hi - lo, 1e-6)
    return lo - margin * width, hi + margin * width


def sample_flags(per_sample, fractions, training_fractions, memorisation, tissues, range_margin=0.25,
                 training_volumes=None):
    """Per synthetic sample: ``missed_conditioning`` (a requested lesion type absent or an
    unrequested one present), ``tissue_out_of_range`` (a tissue fraction outside the training
    range widened by ``range_margin`` x its width on each side), ``lesion_out_of_range`` (a
    requested lesion type, drawn, with a volume outside the range of the training maps holding
    it, widened the same way; needs ``training_volumes``, :func:`lesion_volumes` of the training
    maps; an absent one is missed conditioning),
    ``near_copy`` (memorisation audit) and ``flagged`` (any)."""
    lo, hi = _widened_range(training_fractions[tissues], range_margin)
    out = pd.DataFrame({"sample": per_sample["sample"].to_numpy()})
    out["missed_conditioning"] = ~(per_sample["requested_present"].to_numpy() &
                                   per_sample["unrequested_absent"].to_numpy())
    bad = [[t for t in tissues if not lo[t] <= fractions.iloc[i][t] <= hi[t]] for i in range(len(fractions))]
    out["tissue_out_of_range"] = [bool(b) for b in bad]
    out["tissues_out_of_range"] = [",".join(b) for b in bad]
    types = [c[len("voxels_"):] for c in per_sample.columns if c.startswith("voxels_")]
    big = [[] for _ in range(len(out))]
    for t in types if training_volumes is not None else []:
        holding = _volumes_holding(training_volumes, t)
        if not len(holding):
            continue
        vlo, vhi = _widened_range(holding, range_margin)
        vol = per_sample[f"voxels_{t}"].to_numpy()
        drawn = per_sample[f"requested_{t}"].to_numpy() & per_sample[f"present_{t}"].to_numpy()
        for i in np.flatnonzero(drawn & ((vol < vlo) | (vol > vhi))):
            big[i].append(t)
    out["lesion_out_of_range"] = [bool(b) for b in big]
    out["lesions_out_of_range"] = [",".join(b) for b in big]
    near = memorisation.set_index("synthetic")["closer_than_held_out"] if memorisation is not None else None
    out["near_copy"] = [bool(near.get(s, False)) if near is not None else False for s in out["sample"]]
    out["flagged"] = out["missed_conditioning"] | out["tissue_out_of_range"] | out["lesion_out_of_range"] | \
        out["near_copy"]
    return out


# --------------------------------------------------------------------------- evaluation


def adherence_conditioning(lesion_types, train_values, n_per_mode, seed=0):
    """Conditioning rows for the adherence audit: ``healthy`` (all 0), one mode per lesion type
    alone (``<type>_only``: that type's dc drawn from its non-zero training values) and
    ``unseen`` (every type at once). Returns a DataFrame with ``mode``. (The ``random`` rows
    the arms train on are audited sample by sample by :func:`synthetic_sample_qc`.)"""
    from .brainspade.label_generator import make_conditioning

    types = list(lesion_types)
    tv = np.asarray(train_values, dtype=np.float32)
    parts = [("healthy", make_conditioning("healthy", n_per_mode, types))]
    rng = np.random.default_rng([int(seed), 11])
    for j, mode in enumerate(single_type_modes(types)):
        pos = tv[:, j][tv[:, j] > 0]
        if not len(pos):
            continue
        c = np.zeros((n_per_mode, len(types)), np.float32)
        c[:, j] = rng.choice(pos, size=n_per_mode)
        parts.append((mode, c))
    if len(types) > 1:
        parts.append(("unseen", make_conditioning("unseen", n_per_mode, types, tv, seed=seed)))
    frames = [pd.DataFrame(c, columns=[f"dc_{t}" for t in types]).assign(mode=m) for m, c in parts]
    df = pd.concat(frames, ignore_index=True)
    return df[["mode"] + [f"dc_{t}" for t in types]]


def nearest_dice(maps, reference, n_classes):
    """For each map, the highest :func:`mean_label_dice` to any reference map."""
    return np.asarray([max(mean_label_dice(a, b, n_classes) for b in reference) for a in maps])


def closeness_to_training(hard, real, held, n_classes):
    """Memorisation against the right baseline: nearest-training Dice of each map, the same for
    the held-out real maps, and whether each map is closer to a training map than any held-out
    subject is (all False without held-out maps)."""
    near = nearest_dice(hard, real, n_classes)
    near_held = nearest_dice(held, real, n_classes) if held is not None and len(held) else np.zeros(0)
    closer = near > near_held.max() if len(near_held) else np.zeros(len(near), bool)
    return near, near_held, closer


def _hard_maps(paths, n_classes):
    from . import common as C

    return np.stack([C.load_prob_label(p, n_classes).argmax(0).astype(np.uint8) for p in paths])


def reconstruct(vae_path, paths, names, split, device="cpu", calibration=None):
    """Rows of :func:`reconstruction_rows` for each ``{subject: probabilistic map path}``,
    encoded to the posterior mean and decoded by the label VAE (the LDM's view of the data; with
    the VAE's ``calibration`` where given, as sampling decodes), the given maps after argmax
    ``(N, *spatial)`` (read once for both) and their reconstructions after argmax (None for no
    maps)."""
    import torch

    from . import common as C
    from .brainspade.label_generator import decoded_logits, load_vae

    vae, pay = load_vae(vae_path, device, calibration)
    rows, given, decoded = [], [], []
    with torch.no_grad():
        for subject, p in paths.items():
            x = torch.from_numpy(C.load_prob_label(p, pay["n_classes"]))[None]
            mu, _ = vae.encode(C.pad_background(x, pay["padded_shape"]).to(device))
            decoded.append(C.crop_to(decoded_logits(vae, mu), pay["shape"])[0].argmax(0).cpu().numpy()
                           .astype(np.uint8))
            given.append(x[0].argmax(0).numpy().astype(np.uint8))
            rows += reconstruction_rows(given[-1], decoded[-1], names, subject, split)
    return rows, (np.stack(given) if given else None), (np.stack(decoded) if decoded else None)


def _target_row(group, measure, value, target=None, op=None, n=None, note=""):
    ok = None
    if target is not None and np.isfinite(value):
        ok = bool(value <= target if op == "<=" else value >= target)
    elif target is not None:
        ok = False
    return {"group": group, "measure": measure, "value": value,
            "target": "" if target is None else f"{op} {target:g}", "pass": ok, "n": n, "note": note}


def evaluate_label_generator(vae_path, ldm_path, training, held_out, out, *, n_per_mode=50, seed=0,
                             schema=None, voxel_mm=1.0, sampling=None, min_voxels=5, tissue_tolerance=0.15,
                             max_pairs=300, device="auto", calibration=None, sampling_calibration=None):
    """The label generator's fidelity audit (issue gate of the autoencoder, then the LDM).

    ``training`` / ``held_out``: ``{subject: probabilistic map path}``. ``out``: dict of output
    paths ``reconstruction``, ``gate``, ``adherence``, ``samples``, ``fidelity``, ``figure``.
    ``calibration``: the VAE's class offsets (JSON of ``calibrate_label_vae``), used by the
    reconstructions, and by the samples unless ``sampling_calibration`` is given (the tissue
    offsets of rule ``fit_label_sampling`` added to them). Returns the fidelity table (DataFrame).
    """
    from ..io import save_table
    from ..labels import LabelSchema
    from .brainspade.label_generator import (calibration_record, resolve_unrequested_lesions, sample_labels,
                                             sampling_config, training_conditioning)

    schema = schema or LabelSchema()
    names = schema.names
    rec_train, real, real_decoded = reconstruct(vae_path, training, names, "train", calibration=calibration)
    rec_held, held, held_decoded = reconstruct(vae_path, held_out, names, "held_out", calibration=calibration)
    rec = rec_train + rec_held
    save_table(pd.DataFrame(rec), out["reconstruction"])
    gate = reconstruction_gate(rec, schema, split="held_out" if held_out else "train")
    save_table(gate, out["gate"])

    types, train_values = training_conditioning(ldm_path)
    cond = adherence_conditioning(types, train_values, n_per_mode, seed)
    # batches of 10: fewer, larger U-Net calls than the sampling rule's 4 (the initial noise is
    # seeded per sample, so the batch size changes no sample beyond float rounding)
    requests = cond[[f"dc_{t}" for t in types]].to_numpy(np.float32)
    probs = sample_labels(vae_path, ldm_path, requests, seed=seed, device=device, sampling=sampling, progress=False,
                          batch_size=10, calibration=sampling_calibration or calibration)
    # adherence judges the networks: the decoded maps, before unrequested lesion types are removed;
    # every other figure the maps as the samples carry them
    decoded = probs.argmax(1).astype(np.uint8)
    unrequested = sampling_config(ldm_path, sampling)["unrequested_lesions"]
    resolved, leaked = resolve_unrequested_lesions(probs, requests, types, schema, unrequested)
    hard = resolved.argmax(1).astype(np.uint8)
    del probs, resolved
    ids = [f"{m}_{i:03d}" for m, i in zip(cond["mode"], cond.groupby("mode").cumcount())]
    vols = lesion_volumes(decoded, schema, ids)
    summary, per = conditioning_adherence(vols, cond, min_voxels)
    per.insert(0, "sample", ids)
    per["unrequested_lesion_voxels"] = leaked

    fr_syn, fr_real = tissue_fractions(hard, schema), tissue_fractions(real, schema)
    real_volumes = lesion_volumes(real, schema)
    phenotypes = lesion_phenotypes(real_volumes, types, min_voxels)
    tissue = tissue_fraction_check_by_phenotype(fr_syn, cond["mode"].to_numpy(), fr_real, phenotypes,
                                                schema.tissues, tissue_tolerance)
    pooled = tissue_fraction_check(fr_syn, fr_real, schema.tissues, tissue_tolerance).set_index("tissue")
    per = pd.concat([per, fr_syn.add_prefix("fraction_")], axis=1)
    near_syn, near_held, per["closer_than_held_out"] = closeness_to_training(hard, real, held, schema.n_classes)
    per["nearest_training_dice"] = near_syn
    save_table(per, out["samples"])
    save_table(summary, out["adherence"])

    rows = [_target_row("reconstruction", f"dice_{g['class']}", g["dice_mean"], g["threshold"], ">=",
                        g["n_subjects_with_class"],
                        f"held-out; created in healthy: {g['created_in_healthy']}") for _, g in gate.iterrows()]
    for _, a in summary.iterrows():
        if a["measure"] == "any_lesion":
            rows.append(_target_row("adherence", f"{a['mode']}_any_lesion", a["value"], 0.05, "<=", a["n"],
                                    "decoded maps"))
        elif a["measure"] == "requested_present" and a["lesion_type"] == "all":
            rows.append(_target_row("adherence", f"{a['mode']}_requested_present", a["value"],
                                    0.8 if a["mode"] == "unseen" else 0.9, ">=", a["n"]))
        elif a["measure"] == "unrequested_absent":
            rows.append(_target_row("adherence", f"{a['mode']}_unrequested_absent", a["value"], n=a["n"],
                                    note="decoded maps"))
            leak = per.loc[per["mode"] == a["mode"], "unrequested_lesion_voxels"]
            rows.append(_target_row("adherence", f"{a['mode']}_unrequested_voxels", float(leak.mean()), n=len(leak),
                                    note=f"decoded voxels of unrequested lesion types per map (max {int(leak.max())}): "
                                    f"{'removed from' if unrequested == 'remove' else 'kept in'} the samples "
                                    f"(sampling.unrequested_lesions: {unrequested})"))
        elif a["measure"] == "spearman":
            rows.append(_target_row("adherence", f"spearman_dc_volume_{a['lesion_type']}", a["value"], 0.7, ">=",
                                    a["n"]))
    for t, (ratio, n_syn, n_real) in lesion_volume_ratios(per, real_volumes, types).items():
        rows.append(_target_row("adherence", f"volume_ratio_{t}", ratio, n=n_syn,
                                note=f"median voxels of {t}-only samples / of the {n_real} training maps holding {t}"))
    for _, t in tissue.iterrows():
        rows.append(_target_row("tissue", f"fraction_{t['tissue']}_relative_difference", t["relative_difference"],
                                n=t["n_synthetic"], note=f"synthetic {t['synthetic_mean']:.4f} vs training "
                                f"{t['training_mean']:.4f}, like for like: modes {t['modes'] or 'none'} against "
                                "the training maps of their lesion phenotype")
                    | {"target": f"|x| <= {tissue_tolerance:g}", "pass": bool(t["pass"])})
        p = pooled.loc[t["tissue"]]
        rows.append(_target_row("tissue", f"fraction_{t['tissue']}_relative_difference_all_modes",
                                p["relative_difference"], n=len(hard),
                                note=f"every sample (unseen included) {p['synthetic_mean']:.4f} vs the plain "
                                f"training mean {p['training_mean']:.4f}"))
        rows.append(_target_row("tissue", f"cohens_d_{t['tissue']}", p["cohens_d"], n=len(hard),
                                note="every sample vs every training map, tissue fraction"))
    like = pairwise_dice_by_phenotype(hard, cond["mode"].to_numpy(), real, phenotypes, schema.n_classes,
                                      max_pairs=max_pairs, seed=seed).set_index("mode")
    for mode, d in like.iterrows():
        rows.append(_target_row("diversity", f"pairwise_dice_{mode}_synthetic", d["synthetic"], d["target"], "<=",
                                d["n_synthetic_pairs"], f"std {d['synthetic_std']:.3f}; like for like: the "
                                f"{mode} samples against the training maps of that phenotype"))
        rows.append(_target_row("diversity", f"pairwise_dice_{mode}_training", d["training"],
                                n=d["n_training_pairs"], note=f"std {d['training_std']:.3f}"))
        # the same training maps through the VAE: the diversity any LDM sample could keep
        through_vae = pairwise_dice(real_decoded[phenotypes == mode], schema.n_classes, max_pairs, seed)
        rows.append(_target_row("diversity", f"pairwise_dice_{mode}_reconstructed", through_vae[0], n=through_vae[2],
                                note="the same training maps encoded and decoded by the label VAE"))
    warp = calibration_record(sampling_calibration).get("deformation")
    if warp:  # the samples' spread is partly the deformation's: say so, and what the LDM gave alone
        sizes = {f"_{g}": v for g, v in warp.get("std_mm_by_phenotype", {}).items()} or {"": warp["std_mm"]}
        for suffix, size in sizes.items():
            rows.append(_target_row("diversity", f"deformation_std_mm{suffix}", size, n=warp["maps"],
                                    note="each sample warped by its own random smooth field of this standard "
                                    "deviation, fitted by rule fit_label_sampling"
                                    + ("; phenotypes without training maps of their own not warped" if suffix
                                       else "")))
        rows.append(_target_row("diversity", "pairwise_dice_fit_maps_undeformed", warp["pairwise_dice_before"],
                                n=warp["maps"], note=f"the fit's maps (drawn at the training maps' conditioning) "
                                f"before the warp, within phenotypes: the LDM's own diversity; after the warp "
                                f"{warp['pairwise_dice_after']:.3f}, training maps {warp['pairwise_dice_training']:.3f}"))
    syn_div = pairwise_dice(hard, schema.n_classes, max_pairs, seed)
    real_div = pairwise_dice(real, schema.n_classes, max_pairs, seed)
    rows.append(_target_row("diversity", "pairwise_dice_synthetic_all_modes", syn_div[0], n=syn_div[2],
                            note=f"std {syn_div[1]:.3f}; every sample, the modes mixed (a pair of two "
                            "phenotypes scores the lesion classes of one 0)"))
    rows.append(_target_row("diversity", "pairwise_dice_training_all_modes", real_div[0], n=real_div[2],
                            note=f"std {real_div[1]:.3f}"))
    # label FID and k-NN precision / recall (nan where a set is too small) of the samples, of the
    # held-out real maps (the real-real reference) and of the held-out maps through the VAE: every
    # sample is a decoded latent, so those are as close as a perfect LDM's samples could come
    feats_real = label_features(vae_path, real, schema.n_classes)
    note = f"label VAE encoder features ({feats_real.shape[1]}: mean, std per latent channel)"
    notes = {"synthetic": note, "held_out": f"{note}; the real-real reference",
             "reconstructed_held_out": f"{note}; held-out maps encoded and decoded by the label VAE: the best "
                                       "any LDM sample can reach"}
    sets = {"synthetic": hard}
    if held is not None:
        sets |= {"held_out": held, "reconstructed_held_out": held_decoded}
    for r in against_reference(feats_real, {k: label_features(vae_path, maps, schema.n_classes)
                                            for k, maps in sets.items()}):
        rows.append(_target_row("distribution", f"fid_{r['set']}_vs_training", r["fid"], n=r["n"],
                                note=notes[r["set"]]))
        for m in ("precision", "recall"):
            rows.append(_target_row("distribution", f"{m}_{r['set']}", r[m], n=r["n"],
                                    note="k-NN, k=3 (nan: <= 3 maps in a set)"))
    spread_syn = lesion_centroid_spread(hard, schema, voxel_mm)
    spread_real = lesion_centroid_spread(real, schema, voxel_mm)
    for t in schema.lesion_types:
        rows.append(_target_row("diversity", f"centroid_spread_mm_{t}_synthetic", spread_syn[t]["centroid_spread_mm"],
                                n=spread_syn[t]["n_with_lesion"]))
        rows.append(_target_row("diversity", f"centroid_spread_mm_{t}_training", spread_real[t]["centroid_spread_mm"],
                                n=spread_real[t]["n_with_lesion"]))
    rows.append(_target_row("memorisation", "nearest_training_dice_synthetic_max", float(near_syn.max()),
                            n=len(near_syn), note=f"mean {near_syn.mean():.3f}"))
    if len(near_held):
        rows.append(_target_row("memorisation", "nearest_training_dice_held_out_max", float(near_held.max()),
                                n=len(near_held), note=f"mean {near_held.mean():.3f}"))
        rows.append(_target_row("memorisation", "share_closer_than_any_held_out",
                                float(per["closer_than_held_out"].mean()), n=len(per)))
    fidelity = pd.DataFrame(rows)
    save_table(fidelity, out["fidelity"])
    adherence_figure(per, types, fr_syn, fr_real, out["figure"])
    return fidelity


def adherence_figure(per, types, fractions, training_fractions, path):
    """Requested dc vs generated lesion volume per lesion type, coloured by mode; tissue volume
    fractions of the samples beside the training maps'."""
    from ..io import save_figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(types) + 1, figsize=(4 * len(types) + 5, 3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(types) + [1.4]})
    for ax, t in zip(axes[0], types):
        for mode, g in per.groupby("mode", sort=False):
            ax.scatter(g[f"dc_{t}"], g[f"voxels_{t}"], s=10, alpha=0.6, label=mode)
        ax.set_xlabel(f"requested dc_{t}")
        ax.set_ylabel(f"generated {t} voxels")
        ax.set_title(t)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    tissues = list(fractions.columns)
    pos = np.arange(len(tissues))
    for off, df, name in ((-0.2, training_fractions, "training"), (0.2, fractions, "synthetic")):
        bp = ax.boxplot([df[t] for t in tissues], positions=pos + off, widths=0.35, patch_artist=True,
                        showfliers=False)
        for b in bp["boxes"]:
            b.set_facecolor("#9ecae1" if name == "training" else "#fdae6b")
    ax.set_xticks(pos, tissues, fontsize=8)
    ax.set_ylabel("share of brain volume")
    ax.set_title("tissue fractions: training (blue) vs synthetic (orange)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def synthetic_sample_qc(manifest, sample_labels, training, held_out, schema=None, min_voxels=5):
    """Per-sample QC of the synthetic subjects the segmentation arms train on.

    ``manifest``: the sampling manifest (``subject``, ``conditioning_mode``, ``dc_<type>``);
    ``sample_labels``: ``{sample id: hard label path}``; ``training`` / ``held_out``:
    ``{subject: probabilistic map path}``. Returns :func:`sample_flags` with the lesion volumes,
    tissue fractions and nearest-training Dice beside the flags.
    """
    from ..labels import LabelSchema
    from . import common as C

    schema = schema or LabelSchema()
    manifest = manifest.copy()
    manifest["subject"] = manifest["subject"].astype(str)
    missing = [s for s in manifest["subject"] if s not in sample_labels]
    if missing:
        raise InputError(f"samples {missing[:5]} of the manifest have no label map", fix="rerun sample_synthetic")
    hard = np.stack([C.load_image(sample_labels[s]).round().astype(np.uint8) for s in manifest["subject"]])
    real = _hard_maps(list(training.values()), schema.n_classes)
    held = _hard_maps(list(held_out.values()), schema.n_classes) if held_out else None
    return sample_qc_of_maps(manifest, hard, real, held, schema, min_voxels)[0]


def sample_qc_of_maps(manifest, hard, real, held, schema, min_voxels=5):
    """:func:`synthetic_sample_qc` on loaded hard maps (``hard`` in the manifest's order; ``held``
    None without held-out maps). Returns ``(per-sample table, training tissue fractions,
    nearest-training Dice of the held-out maps)``: the real baselines the benchmark reads beside it."""
    ids = list(manifest["subject"].astype(str))
    cond = manifest.rename(columns={"conditioning_mode": "mode"})[
        ["mode"] + [c for c in manifest.columns if c.startswith("dc_")]]
    if cond.empty or not any(c.startswith("dc_") for c in cond.columns):
        raise InputError("the sampling manifest has no dc_<lesion type> column", fix="rerun sample_synthetic")
    _, per = conditioning_adherence(lesion_volumes(hard, schema, ids), cond, min_voxels)
    per.insert(0, "sample", ids)
    fr_syn, fr_real = tissue_fractions(hard, schema), tissue_fractions(real, schema)
    near, near_held, closer = closeness_to_training(hard, real, held, schema.n_classes)
    mem = pd.DataFrame({"synthetic": ids, "closer_than_held_out": closer})
    flags = sample_flags(per, fr_syn, fr_real, mem, schema.tissues, training_volumes=lesion_volumes(real, schema))
    extra = per[["sample"] + [c for c in per.columns if c.startswith(("dc_", "voxels_"))]]
    out = extra.merge(flags, on="sample")
    out = pd.concat([out, fr_syn.add_prefix("fraction_")], axis=1)
    out["nearest_training_dice"] = near
    return out, fr_real, near_held
