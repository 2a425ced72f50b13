"""The synthetic-sample contract every generator writes, so arms and quality rules read any of them.

A generator's output folder holds::

    samples/<id>/label.nii.gz          class values of the label schema
    samples/<id>/<modality>.nii.gz     one image per modality it makes, on the label's grid
    manifest.tsv                       one row per sample: subject, seed, then what the generator records

:func:`check_samples` is run by each generator on what it wrote, so a generator that leaves a
file out fails naming it instead of handing a segmentation arm half a sample;
:func:`write_montage` draws the montage every generator writes beside its samples.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import save_figure
from ..qc import label_cmap

MANIFEST_COLUMNS = ("subject", "seed")


def check_samples(out_dir, subjects, modalities, generator):
    """Raise :class:`InputError` naming the generator, sample and file that break the contract."""
    out_dir = Path(out_dir)
    fix = f"rerun the {generator} generator's rule; a plugin must write every file of the contract"
    manifest = out_dir / "manifest.tsv"
    if not manifest.is_file():
        raise InputError(f"generator {generator!r} wrote no manifest", file=manifest, fix=fix)
    table = pd.read_csv(manifest, sep="\t", dtype={"subject": str})
    missing_cols = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing_cols:
        raise InputError(f"generator {generator!r}: manifest lacks column(s) {missing_cols}", file=manifest, fix=fix)
    absent = [s for s in subjects if s not in set(table["subject"])]
    if absent:
        raise InputError(f"generator {generator!r}: manifest has no row for sample {absent[0]}",
                         subject=absent[0], file=manifest, fix=fix)
    for sid in subjects:
        folder = out_dir / "samples" / sid
        label = folder / "label.nii.gz"
        if not label.is_file():
            raise InputError(f"generator {generator!r}: sample {sid} has no label map", subject=sid, file=label,
                             fix=fix)
        shape = nib.load(str(label)).shape[:3]
        for m in modalities:
            image = folder / f"{m}.nii.gz"
            if not image.is_file():
                raise InputError(f"generator {generator!r}: sample {sid} has no {m} image", subject=sid,
                                 file=image, fix=fix)
            if nib.load(str(image)).shape[:3] != shape:
                raise InputError(f"generator {generator!r}: sample {sid}'s {m} image is not on its label's grid "
                                 f"({nib.load(str(image)).shape[:3]} vs {shape})", subject=sid, file=image, fix=fix)


def write_montage(rows, modalities, n_classes, path, max_rows=8):
    """``rows``: list of (id, hard label (X,Y,Z), {modality: (X,Y,Z)}); mid-axial slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[:max_rows]
    ncol = 1 + len(modalities)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 1.9 * len(rows)), squeeze=False)
    cmap = label_cmap(n_classes, background=(0, 0, 0, 1))
    for r, (sid, lab, imgs) in enumerate(rows):
        z = lab.shape[-1] // 2
        axes[r, 0].imshow(np.rot90(lab[..., z]), cmap=cmap, vmin=0, vmax=n_classes - 1, interpolation="nearest")
        axes[r, 0].set_ylabel(sid, fontsize=7)
        for c, m in enumerate(modalities, start=1):
            axes[r, c].imshow(np.rot90(imgs[m][..., z]), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(m, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("label", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
