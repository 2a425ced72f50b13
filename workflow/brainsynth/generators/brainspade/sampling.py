"""Synthetic subjects: label generator -> image generator -> NIfTI files + manifest + montage.

:func:`sample_synthetic` writes, for ``N`` synthetic subjects ``{id}`` (``syn0001`` ...)::

    samples/{id}/label.nii.gz       hard labels (argmax of the map), uint8, values = class values
    samples/{id}/labelprob.nii.gz   probabilistic map (X, Y, Z, K) float32, channels sum to 1
    samples/{id}/{modality}.nii.gz  one image per modality of the image generator, [0, 1]
    manifest.tsv                    subject, seed, conditioning_mode, dc_<type>..., style_<modality>...,
                                    unrequested_lesion_voxels (decoded voxels of lesion types the
                                    request did not ask for; removed with sampling.unrequested_lesions:
                                    remove)
    montage.png                     rows: samples; columns: label, then each modality (mid-axial slice)

with the affine of a reference NIfTI on the working grid. The output depends
only on the models, the style subjects, ``n``, the conditioning and ``seed``:
conditioning values come from ``make_conditioning(seed)``, the label maps from
``sample_labels(seed)``, the style source of sample ``i`` (one subject per
modality) from ``numpy.random.default_rng([seed, i])`` and its images from
``generate_images(seed*1000+i)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ...errors import InputError
from ...io import save_nifti, save_table
from ...labels import LabelSchema
from .. import common as C
from ..contract import check_samples, write_montage
from .image_generator import generate_images, load_generator
from .label_generator import (make_conditioning, resolve_unrequested_lesions, sample_labels, sampling_config,
                              training_conditioning)

log = logging.getLogger("brainsynth.generators.brainspade.sampling")


def _style_table(style_subjects, modalities):
    """list of dicts / DataFrame / dict subject -> {modality: path}  ->  list of (subject, {mod: path})."""
    if isinstance(style_subjects, pd.DataFrame):
        rows = style_subjects.to_dict("records")
    elif isinstance(style_subjects, dict):
        rows = [{"subject": s, **paths} for s, paths in style_subjects.items()]
    else:
        rows = list(style_subjects)
    out = []
    for r in rows:
        if "subject" not in r:
            raise InputError("style subject entries need a 'subject' key", field="style_subjects")
        paths = {m: r[m] for m in modalities if m in r and r[m] is not None and not
                 (isinstance(r[m], float) and np.isnan(r[m]))}
        out.append((str(r["subject"]), paths))
    for m in modalities:
        if not any(m in p for _, p in out):
            raise InputError(f"no style subject has a {m} image", field="style_subjects",
                             fix=f"give at least one real subject with a {m} image")
    return out


def _style_drawer(styles, modalities, spatial):
    """``draw(seed, i)`` -> (style source per modality, style volume per modality) of sample ``i``.

    One real subject per modality, drawn with ``numpy.random.default_rng([seed, i])``
    (so a sample's style does not depend on how many samples are drawn).
    """
    cache = {}

    def style_volume(path):
        if path not in cache:
            cache[path] = C.load_image(path)
        return cache[path]

    def draw(seed, i):
        rng = np.random.default_rng([int(seed), i])
        style_src, style_imgs = {}, {}
        for m in modalities:
            cands = [(s, p[m]) for s, p in styles if m in p]
            s, p = cands[int(rng.integers(len(cands)))]
            style_src[m] = s
            vol = style_volume(p)
            if vol.shape[:2] != tuple(spatial[:2]):
                raise InputError(f"style image grid {vol.shape} differs from the generated grid {tuple(spatial)}",
                                 file=p, fix="use preprocessed images on the working grid")
            style_imgs[m] = vol if spatial[2] == vol.shape[2] else vol[..., vol.shape[2] // 2]
        return style_src, style_imgs

    return draw


def sample_synthetic(*, label_vae, label_ldm, image_generator, style_subjects, n, out_dir, reference,
                     conditioning="random", conditioning_values=None, seed=0, scheduler=None, steps=None,
                     sampling=None, id_prefix="syn", device="auto", batch_size=None, montage=True,
                     label_calibration=None, schema=None):
    """Generate ``n`` synthetic subjects into ``out_dir``; returns the manifest DataFrame.

    Layout: ``out_dir/samples/<id>/{label,labelprob,<modality>}.nii.gz`` (ids
    ``<id_prefix>0001``...), ``out_dir/manifest.tsv`` and ``out_dir/montage.png``.

    ``style_subjects``: real subjects providing style slices (list of dicts
    ``{subject, t1, t2, flair}``, a DataFrame with those columns, or a dict
    subject -> {modality: path}); for every sample and modality one of them is
    drawn and its volume styles the synthetic volume slice by slice.
    ``conditioning``: ``random`` | ``unseen`` | ``healthy`` | ``explicit`` (with
    ``conditioning_values``, see :func:`make_conditioning`). ``sampling``: the
    ``label_generator.sampling`` settings (guidance scale, scheduler, ...) over those
    stored with the LDM. ``reference``: a NIfTI on the working grid whose affine the
    outputs get. ``label_calibration``: the label VAE's class offsets and temperature (JSON), none: uncalibrated.
    ``schema``: the label schema (default :class:`LabelSchema`), whose lesion types' classes
    ``sampling.unrequested_lesions`` resolves.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(n)
    if n < 1:
        raise InputError("number of synthetic subjects must be >= 1", field="sampling.n")
    dev = C.get_device(device)
    ref = nib.load(str(reference))
    affine = ref.affine
    net, gpay = load_generator(image_generator, dev)
    modalities = list(gpay["modalities"])
    styles = _style_table(style_subjects, modalities)

    types, train_vals = training_conditioning(label_ldm)
    cond = make_conditioning(conditioning, n, types, train_vals, conditioning_values, seed)
    log.info("sampling %d synthetic subjects (conditioning %s, seed %d) into %s", n, conditioning, seed, out_dir)
    probs = sample_labels(label_vae, label_ldm, cond, scheduler=scheduler, steps=steps, seed=seed,
                          batch_size=batch_size, device=device, sampling=sampling, calibration=label_calibration)
    unrequested = sampling_config(label_ldm, sampling)["unrequested_lesions"]
    probs, leaked = resolve_unrequested_lesions(probs, cond, types, schema or LabelSchema(), unrequested)
    if leaked.any():
        log.info("%d of %d label maps hold decoded voxels of lesion types their request did not ask for "
                 "(%d in all): %s (sampling.unrequested_lesions)", int((leaked > 0).sum()), n, int(leaked.sum()),
                 "removed" if unrequested == "remove" else "kept")
    if probs.ndim == 4:  # 2-D label generator: one axial slice per subject
        probs = probs[..., None]
    spatial = probs.shape[2:]
    if tuple(ref.shape[:2]) != tuple(spatial[:2]) or (spatial[2] != 1 and ref.shape[2] != spatial[2]):
        raise InputError(f"reference grid {ref.shape[:3]} differs from the generated grid {spatial}",
                         file=reference, fix="use a NIfTI of the working grid as reference")

    draw_styles = _style_drawer(styles, modalities, spatial)
    rows, montage_rows = [], []
    for i in range(n):
        sid = f"{id_prefix}{i + 1:04d}"
        style_src, style_imgs = draw_styles(seed, i)
        prob = probs[i]
        imgs = generate_images(image_generator, prob, style_imgs, seed=int(seed) * 1000 + i, device=device,
                               net=net, payload=gpay)
        hard = np.argmax(prob, axis=0).astype(np.uint8)
        sdir = out_dir / "samples" / sid
        save_nifti(hard, affine, sdir / "label.nii.gz", dtype=np.uint8)
        save_nifti(np.moveaxis(prob, 0, -1).astype(np.float32), affine, sdir / "labelprob.nii.gz",
                   dtype=np.float32)
        for m in modalities:
            save_nifti(imgs[m].astype(np.float32), affine, sdir / f"{m}.nii.gz", dtype=np.float32)
        row = {"subject": sid, "seed": int(seed), "conditioning_mode": conditioning}
        row.update({f"dc_{t}": float(cond[i, j]) for j, t in enumerate(types)})
        row.update({f"style_{m}": style_src[m] for m in modalities})
        row["unrequested_lesion_voxels"] = int(leaked[i])
        rows.append(row)
        montage_rows.append((sid, hard, imgs))
        log.info("synthetic subject %d/%d: %s (dc %s, style %s)", i + 1, n, sid,
                 np.round(cond[i], 3).tolist(), style_src)
    manifest = pd.DataFrame(rows)
    save_table(manifest, out_dir / "manifest.tsv")
    if montage:
        write_montage(montage_rows, modalities, probs.shape[1], out_dir / "montage.png")
    check_samples(out_dir, list(manifest["subject"]), modalities, "brainspade")
    return manifest


def restyle_synthetic(*, image_generator, samples_dir, subjects, style_subjects, out_dir, reference, seed=0,
                      device="auto", montage=True, modalities=None):
    """Images in other styles for synthetic label maps already drawn; returns the manifest.

    The domain-shift experiment: the same synthetic labels (``samples_dir/<id>/labelprob.nii.gz``
    of :func:`sample_synthetic`), imaged with styles from other real subjects (e.g. an
    out-of-distribution site), so arms that differ only in style share their labels.
    Writes ``out_dir/samples/<id>/<modality>.nii.gz``, ``out_dir/manifest.tsv``
    (subject, seed, style_<modality>) and ``out_dir/montage.png``; style draws and
    images are seeded as in :func:`sample_synthetic`. ``modalities``: those to image (default:
    every modality of the generator; a T1-only style set images T1 only).
    """
    out_dir, samples_dir = Path(out_dir), Path(samples_dir)
    subjects = [str(s) for s in subjects]
    if not subjects:
        raise InputError("no synthetic subjects to restyle", field="synthesis.n_samples")
    dev = C.get_device(device)
    affine = nib.load(str(reference)).affine
    net, gpay = load_generator(image_generator, dev)
    modalities = list(gpay["modalities"] if modalities is None else modalities)
    styles = _style_table(style_subjects, modalities)
    paths = [samples_dir / sid / "labelprob.nii.gz" for sid in subjects]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise InputError(f"{len(missing)} synthetic label map(s) missing", file=missing[0],
                         fix="run sample_synthetic first (it writes samples/<id>/labelprob.nii.gz)")
    draw_styles = _style_drawer(styles, modalities, nib.load(str(paths[0])).shape[:3])
    rows, montage_rows = [], []
    log.info("restyling %d synthetic subjects with %d style subjects into %s", len(subjects), len(styles), out_dir)
    for i, (sid, path) in enumerate(zip(subjects, paths)):
        prob = np.moveaxis(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), -1, 0)
        style_src, style_imgs = draw_styles(seed, i)
        imgs = generate_images(image_generator, prob, style_imgs, seed=int(seed) * 1000 + i, device=device,
                               net=net, payload=gpay)
        for m in modalities:
            save_nifti(imgs[m].astype(np.float32), affine, out_dir / "samples" / sid / f"{m}.nii.gz",
                       dtype=np.float32)
        rows.append({"subject": sid, "seed": int(seed), **{f"style_{m}": style_src[m] for m in modalities}})
        montage_rows.append((sid, np.argmax(prob, axis=0).astype(np.uint8), imgs))
        log.info("restyled synthetic subject %d/%d: %s (style %s)", i + 1, len(subjects), sid, style_src)
    manifest = pd.DataFrame(rows)
    save_table(manifest, out_dir / "manifest.tsv")
    if montage:
        write_montage(montage_rows, modalities, prob.shape[0], out_dir / "montage.png")
    return manifest
