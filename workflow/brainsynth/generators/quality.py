"""Quality of synthetic data: diversity, distribution distance, memorisation, class volumes.

Public API
----------
``ms_ssim_params(shape)``
    ``(kernel_size, weights)`` for monai ``MultiScaleSSIMMetric`` on small
    images: the most scales (<= 5, default MS-SSIM weights renormalised) with a
    Gaussian kernel >= 5 (else 3) that MONAI accepts for every side of ``shape``.
``ms_ssim_diversity(samples, ...) -> dict``
    mean/std of MS-SSIM over all pairs of ``samples`` ``(N, *spatial)``. Lower =
    more diverse; compare with the same value on real data.
``mmd(real, synthetic, ...) -> dict``
    monai ``MMDMetric`` (linear kernel, unbiased U-statistic) between two sets.
    The sets are brought to the same size (random subset of the larger, seeded),
    as MONAI requires. ``mmd`` is the MONAI value divided by the number of voxels
    (comparable between grids), ``mmd_raw`` the MONAI value. Its expectation is 0
    for two independent samples of one distribution (it can be slightly
    negative); for two *identical* sets it is ``-2/(n-1)`` x the within-set
    variance, so ``mmd_biased`` (V-statistic, ``||mean(real) - mean(synthetic)||^2``
    per voxel, >= 0, exactly 0 for identical sets) is reported too.
``nearest_real(synthetic, real, metric, threshold) -> DataFrame``
    memorisation check: for each synthetic sample the most similar real training
    sample (``ssim`` (monai SSIMMetric, higher = closer), ``mse`` (lower = closer)
    or ``dice`` (mean Dice of the non-background classes of hard labels)),
    its similarity and ``near_copy`` (similarity beyond ``threshold``).
``class_volume_fractions(maps, names) -> DataFrame``
    per sample: volume fraction of each non-background class within the brain
    (non-background) volume, and ``brain_fraction`` of the grid. Accepts
    probabilistic ``(N, K, *spatial)`` (soft volumes) or hard ``(N, *spatial)`` maps.
``volume_fractions_vs_training(synthetic, training, names) -> VolumeFractions``
    ``(synthetic, training, summary)`` DataFrames (mean, std per class and set,
    difference of means).
``evaluate_quality(synthetic, real, modalities, out_dir, cfg=None, schema=None) -> dict``
    loads both cohorts from NIfTI and writes ``quality_metrics.tsv`` (long:
    metric, modality, value), ``memorisation.tsv`` and ``volume_fractions.tsv``
    (+ ``volume_fractions_summary.tsv``).
``class_intensities(labels, images, names)`` / ``contrast_ordering(synthetic, real)``
    per-class mean intensity of images on their own label maps, and whether each class is
    brighter/darker than white matter in the synthetic images as in the real ones.
``write_quality_table(rows, path)``

Config (``quality:``): ``near_copy_ssim`` (0.95), ``near_copy_dice`` (0.95),
``near_copy_mse`` (0.001), ``max_pairs`` (190: pairs for MS-SSIM), ``candidates`` (5: real
subjects closest in MSE whose SSIM is computed in the memorisation check), ``seed`` (0).
"""

from __future__ import annotations

import itertools
import logging
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..io import save_table
from . import common as C

log = logging.getLogger("brainsynth.generators.quality")

DEFAULTS = {"near_copy_ssim": 0.95, "near_copy_dice": 0.95, "near_copy_mse": 0.001, "max_pairs": 190,
            "candidates": 5, "seed": 0}
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

VolumeFractions = namedtuple("VolumeFractions", ["synthetic", "training", "summary"])


def _as_batch(x):
    """array/list ``(N, *spatial)`` or ``(N, C, *spatial)`` -> float tensor ``(N, C, *spatial)``."""
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(a) for a in x])
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).contiguous()


def _with_channel(t, spatial_dims):
    if t.ndim == spatial_dims + 1:
        return t[:, None]
    if t.ndim == spatial_dims + 2:
        return t
    raise InputError(f"expected (N, [C,] *spatial) with {spatial_dims} spatial dims, got {tuple(t.shape)}")


def ms_ssim_params(shape):
    """Kernel size and weights that monai MS-SSIM accepts for ``shape``."""
    m = min(int(s) for s in shape)
    for min_k in (5, 3):
        for n in (5, 4, 3, 2):
            div_monai = max(1, n - 1) ** 2
            for k in (11, 9, 7, 5, 3):
                if k < min_k:
                    continue
                if m // div_monai > k - 1 and m / 2 ** (n - 1) >= k:
                    w = np.asarray(MS_SSIM_WEIGHTS[:n], dtype=float)
                    return k, tuple((w / w.sum()).tolist())
    raise InputError(f"images of shape {tuple(shape)} are too small for MS-SSIM (need >= 6 voxels per side)")


def _ssim_kernel(shape):
    m = min(int(s) for s in shape)
    for k in (11, 9, 7, 5, 3):
        if m >= k:
            return k
    raise InputError(f"images of shape {tuple(shape)} are too small for SSIM")


def ms_ssim_diversity(samples, spatial_dims=None, data_range=1.0, kernel_size=None, weights=None,
                      max_pairs=None, seed=0, batch=8):
    """Mean pairwise MS-SSIM among ``samples`` ``(N, *spatial)``; lower = more diverse."""
    from monai.metrics import MultiScaleSSIMMetric

    t = _as_batch(samples)
    sd = spatial_dims or (t.ndim - 1)
    t = _with_channel(t, sd)
    n = t.shape[0]
    if n < 2:
        raise InputError("MS-SSIM diversity needs at least 2 samples")
    k, w = ms_ssim_params(t.shape[2:])
    k = kernel_size or k
    w = tuple(weights or w)
    pairs = list(itertools.combinations(range(n), 2))
    if max_pairs and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=int(max_pairs), replace=False))]
    metric = MultiScaleSSIMMetric(spatial_dims=sd, data_range=data_range, kernel_size=k, weights=w,
                                  reduction="none")
    vals = []
    for b in range(0, len(pairs), batch):
        pb = pairs[b:b + batch]
        a = t[[i for i, _ in pb]]
        c = t[[j for _, j in pb]]
        vals.append(metric(a, c).reshape(-1))
    v = torch.cat(vals).numpy()
    return {"ms_ssim_mean": float(np.mean(v)), "ms_ssim_std": float(np.std(v)), "n_pairs": len(pairs),
            "kernel_size": int(k), "n_scales": len(w)}


def mmd(real, synthetic, mapping=None, seed=0):
    """monai ``MMDMetric`` between two sets ``(N, *spatial)``; see the module docstring."""
    from monai.metrics import MMDMetric

    y = _as_batch(real)
    yp = _as_batch(synthetic)
    if y.shape[1:] != yp.shape[1:]:
        raise InputError(f"real {tuple(y.shape[1:])} and synthetic {tuple(yp.shape[1:])} grids differ")
    n = min(y.shape[0], yp.shape[0])
    if n < 2:
        raise InputError("MMD needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    if y.shape[0] > n:
        y = y[np.sort(rng.choice(y.shape[0], n, replace=False))]
    if yp.shape[0] > n:
        yp = yp[np.sort(rng.choice(yp.shape[0], n, replace=False))]
    raw = float(MMDMetric(y_mapping=mapping)(y[:, None], yp[:, None]))
    fy = (mapping(y[:, None]) if mapping else y).reshape(n, -1).double()
    fp = (mapping(yp[:, None]) if mapping else yp).reshape(n, -1).double()
    nvox = fy.shape[1]
    biased = float(((fy.mean(0) - fp.mean(0)) ** 2).sum())
    return {"mmd": raw / nvox, "mmd_raw": raw, "mmd_biased": biased / nvox, "n_per_set": int(n)}


def _pair_similarity(a, b, metric, n_classes=None):
    """Similarity of one synthetic ``a`` to a stack ``b`` ``(N, ...)`` -> array (N,)."""
    if metric == "mse":
        return ((b - a[None]) ** 2).reshape(b.shape[0], -1).mean(1).numpy()
    if metric == "dice":
        from .label_quality import mean_label_dice

        a = a.long().numpy()
        b = b.long().numpy()
        k = int(n_classes or int(max(a.max(), b.max())) + 1)
        return np.asarray([mean_label_dice(a, bi, k) for bi in b])
    if metric == "ssim":
        from monai.metrics import SSIMMetric

        t = _with_channel(b, a.ndim if a.ndim in (2, 3) else a.ndim - 1)
        sd = t.ndim - 2
        aa = _with_channel(a[None], sd).expand_as(t)
        m = SSIMMetric(spatial_dims=sd, data_range=1.0, win_size=_ssim_kernel(t.shape[2:]), reduction="none")
        return m(aa, t).reshape(-1).numpy()
    raise InputError(f"unknown similarity metric {metric!r}", fix="use ssim, mse or dice")


def nearest_real(synthetic, real, metric="ssim", threshold=None, synthetic_ids=None, real_ids=None,
                 n_classes=None, candidates=None):
    """For each synthetic sample, the closest real sample and a near-copy flag.

    ``synthetic``/``real``: ``(N, *spatial)`` (or ``(N, C, *spatial)`` for ssim/mse).
    ``threshold`` defaults to :data:`DEFAULTS` (ssim 0.95, dice 0.95, mse 0.001).
    ``candidates`` (ssim only): compute SSIM only for the ``candidates`` real samples
    closest in MSE (SSIM of large 3-D volumes is costly).
    """
    s = _as_batch(synthetic)
    r = _as_batch(real)
    if s.shape[1:] != r.shape[1:]:
        raise InputError(f"synthetic {tuple(s.shape[1:])} and real {tuple(r.shape[1:])} grids differ")
    if threshold is None:
        threshold = DEFAULTS[f"near_copy_{metric}"]
    sids = list(synthetic_ids or [f"synthetic_{i}" for i in range(s.shape[0])])
    rids = list(real_ids or [f"real_{i}" for i in range(r.shape[0])])
    rows = []
    for i in range(s.shape[0]):
        if metric == "ssim" and candidates and candidates < r.shape[0]:
            cand = np.argsort(_pair_similarity(s[i], r, "mse"), kind="stable")[:int(candidates)]
            sim = np.full(r.shape[0], -np.inf)
            sim[cand] = _pair_similarity(s[i], r[torch.as_tensor(cand)], "ssim")
        else:
            sim = _pair_similarity(s[i], r, metric, n_classes)
        j = int(np.argmin(sim)) if metric == "mse" else int(np.argmax(sim))
        v = float(sim[j])
        near = v <= threshold if metric == "mse" else v >= threshold
        rows.append({"synthetic": sids[i], "nearest_real": rids[j], "metric": metric, "similarity": v,
                     "threshold": float(threshold), "near_copy": bool(near)})
    return pd.DataFrame(rows)


def class_volume_fractions(maps, names=None, ids=None):
    """Per sample: each non-background class's share of the brain volume, + ``brain_fraction``."""
    arr = np.asarray(maps) if not isinstance(maps, (list, tuple)) else np.stack([np.asarray(a) for a in maps])
    prob = np.issubdtype(arr.dtype, np.floating) and names is not None and arr.ndim >= 4 and \
        arr.shape[1] == len(names)
    if prob:
        vols = arr.reshape(arr.shape[0], arr.shape[1], -1).sum(-1).astype(np.float64)
        k = arr.shape[1]
        nvox = arr[0, 0].size
    else:
        lab = arr.astype(np.int64)
        k = len(names) if names is not None else int(lab.max()) + 1
        vols = np.stack([np.bincount(x.ravel(), minlength=k)[:k] for x in lab]).astype(np.float64)
        nvox = lab[0].size
    names = list(names or [f"class_{c}" for c in range(k)])
    brain = vols[:, 1:].sum(1)
    rows = []
    for i in range(vols.shape[0]):
        row = {"subject": (ids[i] if ids is not None else i), "brain_fraction": brain[i] / nvox}
        for c in range(1, k):
            row[names[c]] = vols[i, c] / brain[i] if brain[i] > 0 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def volume_fractions_vs_training(synthetic, training, names=None, synthetic_ids=None, training_ids=None):
    """Class volume fractions of synthetic samples and of the training set, + summary."""
    syn = class_volume_fractions(synthetic, names, synthetic_ids)
    tr = class_volume_fractions(training, names, training_ids)
    cols = [c for c in syn.columns if c != "subject"]
    rows = []
    for c in cols:
        rows.append({"class": c, "synthetic_mean": syn[c].mean(), "synthetic_std": syn[c].std(ddof=0),
                     "training_mean": tr[c].mean(), "training_std": tr[c].std(ddof=0),
                     "difference": syn[c].mean() - tr[c].mean()})
    return VolumeFractions(syn, tr, pd.DataFrame(rows))


def class_intensities(labels, images, names):
    """Mean (over maps) of each class's mean intensity in each map, on the map's own labels:
    ``{class name: (mean, std, n maps with the class)}``."""
    per = {n: [] for n in names[1:]}
    for lab, img in zip(labels, images):
        for c, n in enumerate(names[1:], start=1):
            m = lab == c
            if m.any():
                per[n].append(float(img[m].mean()))
    return {n: (float(np.mean(v)) if v else float("nan"), float(np.std(v)) if v else float("nan"), len(v))
            for n, v in per.items()}


def contrast_ordering(synthetic, real, reference="wm"):
    """Per class: is it brighter or darker than ``reference`` in the real images, and is the
    synthetic ordering the same? ``synthetic``/``real``: :func:`class_intensities` dicts.
    Returns rows ``(class, real_sign, synthetic_sign, same_order)``."""
    rows = []
    for n in real:
        if n == reference or not np.isfinite(real[n][0]) or not np.isfinite(synthetic.get(n, (np.nan,))[0]):
            continue
        rs = int(np.sign(real[n][0] - real[reference][0]))
        ss = int(np.sign(synthetic[n][0] - synthetic[reference][0]))
        rows.append({"class": n, "real_vs_" + reference: rs, "synthetic_vs_" + reference: ss, "same_order": rs == ss})
    return rows


def write_quality_table(rows, path):
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return save_table(df, path)


def _load_cohort(subjects, modalities, n_classes):
    ids, labels, imgs = [], [], {m: [] for m in modalities}
    for r in subjects:
        ids.append(str(r["subject"]))
        if r.get("labelprob"):
            labels.append(np.argmax(C.load_prob_label(r["labelprob"], n_classes), 0).astype(np.uint8))
        elif r.get("label"):
            labels.append(C.load_image(r["label"]).round().astype(np.uint8))
        else:
            raise InputError("subject needs a 'label' or 'labelprob' path", subject=r["subject"])
        for m in modalities:
            if not r.get(m):
                raise InputError(f"missing {m} image", subject=r["subject"])
            imgs[m].append(C.load_image(r[m]))
    return ids, np.stack(labels), {m: np.stack(v) for m, v in imgs.items()}


def evaluate_quality(synthetic, real, modalities, out_dir, cfg=None, schema=None):
    """Quality tables of a synthetic cohort against the real training cohort.

    ``synthetic``/``real``: list of dicts ``{subject, label|labelprob, <modality>: path}``.
    Writes ``quality_metrics.tsv``, ``memorisation.tsv``, ``volume_fractions.tsv`` and
    ``volume_fractions_summary.tsv`` in ``out_dir``; returns their paths.
    """
    from ..labels import LabelSchema

    cfg = C.merge_config(DEFAULTS, cfg, where="quality")
    schema = schema or LabelSchema()
    out_dir = Path(out_dir)
    sid, slab, simg = _load_cohort(synthetic, modalities, schema.n_classes)
    rid, rlab, rimg = _load_cohort(real, modalities, schema.n_classes)
    rows = []
    for m in modalities:
        for name, arr in (("synthetic", simg[m]), ("real", rimg[m])):
            if len(arr) >= 2:
                d = ms_ssim_diversity(arr, max_pairs=cfg["max_pairs"], seed=cfg["seed"])
                rows += [{"metric": "ms_ssim_diversity", "set": name, "modality": m, "value": d["ms_ssim_mean"],
                          "std": d["ms_ssim_std"], "n": d["n_pairs"]}]
        if len(simg[m]) >= 2 and len(rimg[m]) >= 2:
            d = mmd(rimg[m], simg[m], seed=cfg["seed"])
            for key in ("mmd", "mmd_biased"):
                rows.append({"metric": key, "set": "synthetic_vs_real", "modality": m, "value": d[key],
                             "std": np.nan, "n": d["n_per_set"]})
    paths = {"metrics": write_quality_table(rows, out_dir / "quality_metrics.tsv")}
    inten = []
    for m in modalities:
        si = class_intensities(slab, simg[m], schema.names)
        ri = class_intensities(rlab, rimg[m], schema.names)
        order = {r["class"]: r["same_order"] for r in contrast_ordering(si, ri)}
        for n in schema.names[1:]:
            inten.append({"modality": m, "class": n, "synthetic_mean": si[n][0], "synthetic_std": si[n][1],
                          "synthetic_n": si[n][2], "real_mean": ri[n][0], "real_std": ri[n][1], "real_n": ri[n][2],
                          "same_order_vs_wm": order.get(n)})
    paths["intensities"] = write_quality_table(inten, out_dir / "class_intensities.tsv")
    mem = nearest_real(slab, rlab, "dice", cfg["near_copy_dice"], sid, rid, schema.n_classes)
    mem = mem.rename(columns={"nearest_real": "nearest_real_label", "similarity": "label_dice",
                              "near_copy": "label_near_copy"}).drop(columns=["metric", "threshold"])
    # images: all modalities as channels; SSIM for the `candidates` nearest in MSE
    s_all = np.stack([simg[m] for m in modalities], 1)
    r_all = np.stack([rimg[m] for m in modalities], 1)
    im = nearest_real(s_all, r_all, "ssim", cfg["near_copy_ssim"], sid, rid, candidates=cfg["candidates"])
    mem["nearest_real_image"] = im["nearest_real"].to_numpy()
    mem["image_ssim"] = im["similarity"].to_numpy()
    mem["image_near_copy"] = mem["image_ssim"] >= cfg["near_copy_ssim"]
    mem["near_copy"] = mem["label_near_copy"] | mem["image_near_copy"]
    paths["memorisation"] = write_quality_table(mem, out_dir / "memorisation.tsv")
    vf = volume_fractions_vs_training(slab, rlab, schema.names, sid, rid)
    both = pd.concat([vf.synthetic.assign(set="synthetic"), vf.training.assign(set="training")])
    paths["volume_fractions"] = write_quality_table(both, out_dir / "volume_fractions.tsv")
    paths["volume_fractions_summary"] = write_quality_table(vf.summary, out_dir / "volume_fractions_summary.tsv")
    log.info("quality: %d synthetic vs %d real subjects; %d near copies", len(sid), len(rid),
             int(mem["near_copy"].sum()))
    return paths
