"""The synthetic-sample contract every generator writes, so arms and quality rules read any of them.

A generator's output folder holds::

    samples/<id>/label.nii.gz          class values of the label schema
    samples/<id>/<modality>.nii.gz     one image per modality it makes, on the label's grid
    manifest.tsv                       one row per sample: subject, seed, then what the generator records

:func:`check_samples` is run by each generator on what it wrote, so a generator that leaves a
file out fails naming it instead of handing a segmentation arm half a sample.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pandas as pd

from ..errors import InputError

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
