"""Lesions grown into real healthy subjects, no training (analysing tumours by synthesis).

A sample is a real healthy training subject (its images and tissue labels on the working grid)
with lesions inserted:

- tumour: a core grown from a seed deep in white matter through brain tissue (not CSF), its
  innermost part necrotic and the rest an enhancing rim, then an oedema shell grown outward
  from the core through white matter and deep grey matter;
- WMH: a few lesions grown from periventricular white-matter seeds, inside white matter.

Growth is rule-based: a lesion takes the voxels of lowest cost, cost = distance from its seed
(or from the core, for the oedema) perturbed by smooth random noise, within the tissues it may
enter, and keeps the connected part holding its seed; the irregular outline comes from the
noise. No mass effect (the surrounding anatomy is not displaced).

Intensities come from the subject's own tissue statistics: each lesion class takes, per
modality, a multiple of the subject's mean white-matter intensity (:data:`CONTRASTS`: FLAIR
hyperintense oedema and WMH, T1 hypointense necrotic core) plus the subject's white-matter
texture, blended into the image at the lesion border.

Lesion volumes follow the training subjects that have lesions (conditioning ``random``: one
subject's volumes per sample; ``unseen``: every lesion type at once, each volume drawn from the
training volumes of that type; ``<type>_only``: that type alone, drawn the same way;
``healthy``: none).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import binary_dilation, distance_transform_edt, gaussian_filter
from scipy.ndimage import label as connected_components

from ..errors import InputError
from ..io import save_nifti, save_table
from ..labels import single_type_modes, single_type_of
from .contract import check_samples, write_montage

log = logging.getLogger("brainsynth.generators.lesion_insertion")

# intensity of each lesion class as a multiple of the subject's mean white-matter intensity
CONTRASTS = {
    "t1": {"wmh": 0.8, "necrotic": 0.4, "oedema": 0.7, "enhancing": 0.85},
    "t2": {"wmh": 1.6, "necrotic": 2.2, "oedema": 1.8, "enhancing": 1.5},
    "flair": {"wmh": 1.5, "necrotic": 0.9, "oedema": 1.5, "enhancing": 1.4},
}
MODES = ("random", "unseen", "healthy")


def grow(allowed, cost_origin, n_voxels, rng, roughness=0.6, smooth=1.5):
    """The ``n_voxels`` cheapest voxels of ``allowed`` (boolean) by noisy distance from
    ``cost_origin`` (a boolean seed region), keeping the part connected to the origin."""
    if n_voxels <= 0 or not allowed.any():
        return np.zeros_like(allowed)
    dist = distance_transform_edt(~cost_origin)
    noise = gaussian_filter(rng.standard_normal(allowed.shape), smooth)
    noise /= noise.std() or 1.0
    radius = (3 * n_voxels / (4 * np.pi)) ** (1 / 3)
    cost = dist + roughness * radius * noise
    cost[~allowed] = np.inf
    order = np.argsort(cost, axis=None, kind="stable")[: int(n_voxels)]
    region = np.zeros(allowed.size, dtype=bool)
    region[order] = True
    region = region.reshape(allowed.shape) & np.isfinite(cost)
    parts, _ = connected_components(region | cost_origin)
    keep = np.unique(parts[cost_origin & (parts > 0)])
    return np.isin(parts, keep) & region


def _seed_voxel(candidates, rng):
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return None
    seed = np.zeros(candidates.size, dtype=bool)
    seed[idx[int(rng.integers(idx.size))]] = True
    return seed.reshape(candidates.shape)


def insert_tumour(label, classes, volumes, rng):
    """Labels with a tumour grown in; ``volumes``: {necrotic, enhancing, oedema} in voxels."""
    out = label.copy()
    wm = label == classes["wm"]
    core_allowed = np.isin(label, [classes[c] for c in ("wm", "gm", "deep_gm") if c in classes])
    deep_wm = distance_transform_edt(wm) >= 2
    seed = _seed_voxel(deep_wm if deep_wm.any() else wm, rng)
    if seed is None:
        return out
    n_core = int(volumes.get("necrotic", 0) + volumes.get("enhancing", 0))
    core = grow(core_allowed, seed, n_core, rng)
    if core.any():
        # the innermost voxels of the core (nearest its seed) are necrotic, the rest its enhancing rim
        core_idx = np.flatnonzero(core)
        depth = distance_transform_edt(~seed).ravel()[core_idx]
        n_nec = int(round(volumes.get("necrotic", 0) * core_idx.size / max(n_core, 1)))
        necrotic = np.zeros(core.size, dtype=bool)
        necrotic[core_idx[np.argsort(depth, kind="stable")[:n_nec]]] = True
        necrotic = necrotic.reshape(core.shape)
        out[core] = classes["enhancing"]
        out[necrotic] = classes["necrotic"]
        oedema_allowed = np.isin(label, [classes[c] for c in ("wm", "deep_gm") if c in classes]) & ~core
        oedema = grow(oedema_allowed, core, int(volumes.get("oedema", 0)), rng)
        out[oedema] = classes["oedema"]
    return out


def insert_wmh(label, classes, volume, rng, max_lesions=6):
    """Labels with WMH grown from periventricular white-matter seeds (``volume`` voxels in all)."""
    out = label.copy()
    wm = label == classes["wm"]
    near_csf = binary_dilation(label == classes["csf"], iterations=2) & wm
    candidates = near_csf if near_csf.any() else wm
    k = int(np.clip(volume // 20, 1, max_lesions))
    for part in np.array_split(np.arange(int(volume)), k):
        free = wm & (out == classes["wm"])
        seed = _seed_voxel(candidates & free, rng)
        if seed is None or part.size == 0:
            break
        out[grow(free, seed, part.size, rng)] = classes["wmh"]
    return out


def lesion_intensities(image, label, lesions, classes, contrasts, rng):
    """``image`` with each lesion class at its contrast times the subject's WM mean, plus WM
    texture, blended at the border; values kept in [0, 1] like the preprocessed images."""
    wm = label == classes["wm"]
    wm_mean, wm_std = float(image[wm].mean()), float(image[wm].std())
    inside = lesions > 0
    target = np.zeros(image.shape, dtype=np.float32)
    for name, ratio in contrasts.items():
        voxels = lesions == classes[name]
        target[voxels] = ratio * wm_mean + wm_std * rng.standard_normal(int(voxels.sum()))
    # a soft border: just outside a lesion the image moves part of the way towards the lesion's
    # intensity there (normalised convolution of the lesion intensities), inside it is the lesion
    mask = inside.astype(np.float32)
    spread = gaussian_filter(mask, 0.7)
    halo = np.divide(gaussian_filter(target * mask, 0.7), spread, out=np.zeros_like(spread), where=spread > 1e-3)
    weight = np.clip(spread * 1.5, 0, 1)
    weight[inside] = 1.0
    halo[inside] = target[inside]
    out = image * (1 - weight) + halo * weight
    out[label == 0] = image[label == 0]
    return np.clip(out, 0, 1).astype(np.float32)


def training_volumes(label_paths, classes, lesion_types):
    """Per training subject (healthy ones too: ``random`` keeps their share of healthy samples,
    as brainSPADE's ``random`` conditioning does): its voxel count of each lesion class."""
    rows = []
    for subject, path in label_paths.items():
        label = np.asarray(nib.load(str(path)).dataobj)
        rows.append({"subject": subject,
                     **{c: int((label == classes[c]).sum()) for t in lesion_types.values() for c in t}})
    return pd.DataFrame(rows)


def conditioning_modes(lesion_types):
    """The conditioning modes lesion insertion draws volumes for (explicit dc values have no
    volume meaning here)."""
    return [*MODES, *single_type_modes(lesion_types)]


def draw_volumes(mode, n, volumes, lesion_types, seed):
    """Per sample {lesion class: voxels} of the conditioning mode (see the module docstring)."""
    modes = conditioning_modes(lesion_types)
    if mode not in modes:
        raise InputError(f"lesion insertion draws volumes for conditioning {modes}, not {mode!r}",
                         field="synthesis.conditioning", fix=f"use one of {modes} for lesion insertion arms")
    rng = np.random.default_rng([int(seed), 11, 1])  # not the stream of any sample ([seed, i])
    classes = [c for t in lesion_types.values() for c in t]
    if mode == "healthy":
        return [dict.fromkeys(classes, 0) for _ in range(n)]
    if volumes.empty or not volumes[classes].to_numpy().any():
        raise InputError("no training subject has a lesion to take volumes from", field="synthesis.training_pool",
                         fix="include subjects with lesions in the generators' training pool")
    if mode == "random":
        rows = volumes.iloc[rng.integers(len(volumes), size=n)]
        return [{c: int(r[c]) for c in classes} for _, r in rows.iterrows()]
    only = single_type_of(mode)
    drawn = {only: lesion_types[only]} if only else lesion_types
    out = []
    for _ in range(n):
        draw = dict.fromkeys(classes, 0)
        for members in drawn.values():
            having = volumes[volumes[members].sum(axis=1) > 0]
            if having.empty:
                raise InputError(f"no training subject has {members} to take volumes from",
                                 field="synthesis.training_pool", fix="include subjects with every lesion type")
            row = having.iloc[int(rng.integers(len(having)))]
            draw.update({c: int(row[c]) for c in members})
        out.append(draw)
    return out


def check_contrasts(contrasts, modalities, lesion_classes):
    """Contrast overrides name modalities of the run and lesion classes of the schema."""
    for m, per_class in (contrasts or {}).items():
        if m not in modalities:
            raise InputError(f"contrasts for {m!r}, not a modality of the run", field=f"lesion_insertion.contrasts.{m}",
                             fix=f"use one of {list(modalities)}")
        unknown = sorted(set(per_class or {}) - set(lesion_classes))
        if unknown:
            raise InputError(f"{unknown} are not lesion classes", field=f"lesion_insertion.contrasts.{m}",
                             fix=f"use {lesion_classes}")


def insert_lesions(*, hosts, training_labels, subjects, out_dir, modalities, classes, lesion_types,
                   conditioning="random", seed=0, contrasts=None, montage=True):
    """Samples ``subjects`` (ids) as real healthy ``hosts`` ({subject: {"label", <modality>: path}})
    with lesions inserted; volumes from ``training_labels`` ({subject: label path}). Returns the
    manifest (subject, seed, generator, host, requested and inserted voxels per lesion class)."""
    out_dir = Path(out_dir)
    lesion_classes = [c for t in lesion_types.values() for c in t]
    check_contrasts(contrasts, modalities, lesion_classes)
    contrasts = {m: {**CONTRASTS.get(m, {}), **((contrasts or {}).get(m) or {})} for m in modalities}
    for m in modalities:
        missing = [c for c in lesion_classes if c not in contrasts[m]]
        if missing:
            raise InputError(f"no contrast for {missing} in {m}", field=f"lesion_insertion.contrasts.{m}",
                             fix="give a multiple of the white-matter mean per lesion class")
    healthy = [s for s, f in hosts.items()
               if not np.isin(np.asarray(nib.load(str(f["label"])).dataobj), [classes[c] for c in lesion_classes]).any()]
    if not healthy:
        raise InputError("no healthy training subject to insert lesions into", field="synthesis.training_pool",
                         fix="include subjects without lesions in the generators' training pool")
    volumes = training_volumes(training_labels, classes, lesion_types)
    requests = draw_volumes(conditioning, len(subjects), volumes, lesion_types, seed)
    rows, montage_rows = [], []
    for i, (sid, request) in enumerate(zip(subjects, requests)):
        rng = np.random.default_rng([int(seed), i])
        host = healthy[int(rng.integers(len(healthy)))]
        nii = nib.load(str(hosts[host]["label"]))
        label = np.asarray(nii.dataobj).astype(np.int16)
        lesions = label.copy()
        if any(request.get(c, 0) for c in lesion_types.get("tumour", [])):
            lesions = insert_tumour(lesions, classes, request, rng)
        if request.get("wmh", 0):
            lesions = insert_wmh(lesions, classes, request["wmh"], rng)
        inserted = np.where(np.isin(lesions, [classes[c] for c in lesion_classes]), lesions, 0)
        sdir = out_dir / "samples" / sid
        save_nifti(lesions.astype(np.uint8), nii.affine, sdir / "label.nii.gz", dtype=np.uint8)
        images = {}
        for m in modalities:
            image = np.asarray(nib.load(str(hosts[host][m])).dataobj, dtype=np.float32)
            images[m] = lesion_intensities(image, label, inserted, classes, contrasts[m], rng)
            save_nifti(images[m], nii.affine, sdir / f"{m}.nii.gz", dtype=np.float32)
        row = {"subject": sid, "seed": int(seed), "generator": "lesion_insertion", "host": host,
               "conditioning_mode": conditioning}
        row.update({f"requested_{c}": int(request.get(c, 0)) for c in lesion_classes})
        row.update({f"inserted_{c}": int((lesions == classes[c]).sum()) for c in lesion_classes})
        rows.append(row)
        montage_rows.append((sid, lesions, images))
        log.info("%s: host %s, inserted %s", sid, host, {c: row[f"inserted_{c}"] for c in lesion_classes})
    manifest = pd.DataFrame(rows)
    save_table(manifest, out_dir / "manifest.tsv")
    if montage:
        write_montage(montage_rows, list(modalities), max(classes.values()) + 1, out_dir / "montage.png")
    check_samples(out_dir, list(subjects), modalities, "lesion_insertion")
    return manifest
