"""Domain-randomised images from label maps (SynthSeg's generative model), no training.

Each class of a label map gets a Gaussian intensity whose mean and standard deviation are
drawn afresh for every sample and modality (Billot et al., SynthSeg: a contrast the
segmenter has never seen, so it learns shape, not contrast); then a smooth multiplicative
bias field (MONAI's ``RandBiasField``), a Gaussian blur of random width (partial volume /
resolution), additive noise, and the preprocessing's percentile scaling inside the brain,
so the images sit on the scale of the real preprocessed ones. Background (class 0) stays 0
like the skull-stripped real images.

:func:`synthesize_gmm` writes the synthetic-sample contract of the generators::

    samples/{id}/label.nii.gz        the input label map (copied: the sample is self-contained)
    samples/{id}/{modality}.nii.gz   one domain-randomised image per modality, [0, 1]
    manifest.tsv                     subject, seed, generator, label_source, mean_<modality>_<class>...
    montage.png

Sample ``i``'s images depend only on its label map, the parameters and
``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from ..errors import InputError
from ..io import save_nifti, save_table
from ..preprocess import normalise_intensity
from .contract import check_samples, write_montage

log = logging.getLogger("brainsynth.generators.gmm")


@dataclass(frozen=True)
class GMMParameters:
    """Ranges the per-sample parameters are drawn from (uniform), in units of the output
    scale before the final percentile scaling (means in [0, 1]); blur in voxels."""

    mean_range: tuple = (0.0, 1.0)
    std_range: tuple = (0.0, 0.05)
    bias_field_coeff: tuple = (0.0, 0.3)
    bias_field_degree: int = 3
    blur_sigma: tuple = (0.0, 1.0)
    noise_std: tuple = (0.0, 0.03)

    @classmethod
    def from_config(cls, cfg):
        """From the config's ``gmm_generator`` section; names the field that is wrong."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"unknown gmm_generator key(s) {unknown}", field=f"gmm_generator.{unknown[0]}",
                             fix=f"use {sorted(known)}")
        out = {}
        for name, value in cfg.items():
            if name == "bias_field_degree":
                if not isinstance(value, int) or value < 1:
                    raise InputError(f"bias_field_degree must be an integer >= 1, got {value!r}",
                                     field="gmm_generator.bias_field_degree", fix="e.g. 3")
                out[name] = value
                continue
            pair = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else ()
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] < 0:
                raise InputError(f"{name} must be [low, high] with 0 <= low <= high, got {value!r}",
                                 field=f"gmm_generator.{name}", fix=f"e.g. {list(getattr(cls, name))}")
            out[name] = pair
        return cls(**out)


def draw_parameters(classes, modalities, params, rng):
    """Per modality: {class: (mean, std)} plus bias coefficient, blur sigma and noise std."""
    drawn = {}
    for m in modalities:
        drawn[m] = {
            "classes": {int(c): (float(rng.uniform(*params.mean_range)), float(rng.uniform(*params.std_range)))
                        for c in classes if c != 0},
            "bias_coeff": float(rng.uniform(*params.bias_field_coeff)),
            "blur_sigma": float(rng.uniform(*params.blur_sigma)),
            "noise_std": float(rng.uniform(*params.noise_std)),
            "bias_seed": int(rng.integers(2**31 - 1)),
        }
    return drawn


def gmm_image(label, drawn, params, rng):
    """One image of ``label`` (integer class map) under the drawn parameters of one modality."""
    from monai.transforms import RandBiasField

    brain = label != 0
    image = np.zeros(label.shape, dtype=np.float32)
    for c, (mean, std) in drawn["classes"].items():
        voxels = label == c
        image[voxels] = mean + std * rng.standard_normal(int(voxels.sum()))
    if drawn["bias_coeff"] > 0:
        # zero-mean coefficients of magnitude up to the drawn one: the field's shape differs per seed
        c = drawn["bias_coeff"]
        field = RandBiasField(degree=params.bias_field_degree, coeff_range=(-c, c), prob=1.0)
        field.set_random_state(drawn["bias_seed"])
        image = np.asarray(field(image[None]), dtype=np.float32)[0]
    if drawn["blur_sigma"] > 0:
        image = gaussian_filter(image, drawn["blur_sigma"])
    if drawn["noise_std"] > 0:
        image = image + drawn["noise_std"] * rng.standard_normal(image.shape).astype(np.float32)
    return normalise_intensity(image, brain)


def synthesize_gmm(*, label_paths, out_dir, modalities, params, seed=0, label_source="", montage=True):
    """Domain-randomised images for the label maps ``{id: path}``; returns the manifest."""
    out_dir = Path(out_dir)
    label_paths = {str(k): Path(v) for k, v in label_paths.items()}
    if not label_paths:
        raise InputError("no label maps to image", field="synthesis.n_samples", fix="draw at least one sample")
    missing = [p for p in label_paths.values() if not p.exists()]
    if missing:
        raise InputError(f"{len(missing)} label map(s) missing", file=missing[0],
                         fix="run the label generator's sampling first")
    rows, montage_rows, n_classes = [], [], 2
    for i, (sid, path) in enumerate(label_paths.items()):
        nii = nib.load(str(path))
        label = np.asarray(nii.dataobj).astype(np.int16)
        classes = np.unique(label)
        n_classes = max(n_classes, int(classes.max()) + 1)
        rng = np.random.default_rng([int(seed), i])
        drawn = draw_parameters(classes, modalities, params, rng)
        images = {m: gmm_image(label, drawn[m], params, rng) for m in modalities}
        sdir = out_dir / "samples" / sid
        save_nifti(label.astype(np.uint8), nii.affine, sdir / "label.nii.gz", dtype=np.uint8)
        for m in modalities:
            save_nifti(images[m], nii.affine, sdir / f"{m}.nii.gz", dtype=np.float32)
        row = {"subject": sid, "seed": int(seed), "generator": "gmm", "label_source": label_source}
        for m in modalities:
            row.update({f"mean_{m}_{c}": round(mu, 4) for c, (mu, _) in drawn[m]["classes"].items()})
        rows.append(row)
        montage_rows.append((sid, label, images))
    manifest = pd.DataFrame(rows)
    save_table(manifest, out_dir / "manifest.tsv")
    if montage:
        write_montage(montage_rows, list(modalities), n_classes, out_dir / "montage.png")
    check_samples(out_dir, list(label_paths), modalities, "gmm")
    log.info("%d domain-randomised samples (%s) in %s", len(rows), ", ".join(modalities), out_dir)
    return manifest
