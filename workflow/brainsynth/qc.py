"""Quality-control montages and the cohort QC table.

A montage shows, per subject, the native T1 with the skull-strip mask outline
and the working-grid images with the label map, so a reader can spot a failed
registration or mask at a glance.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .io import save_figure, save_table  # noqa: E402

LABEL_COLOURS = [
    (0, 0, 0, 0), (0.2, 0.4, 1.0, 1), (0.6, 0.6, 0.6, 1), (1, 1, 1, 1), (1.0, 0.8, 0.2, 1),
    (0.7, 0.3, 0.9, 1), (1.0, 0.1, 0.1, 1), (0.4, 0.1, 0.1, 1), (0.2, 0.9, 0.3, 1), (1.0, 0.5, 0.0, 1),
]


def label_cmap(n, background=(0, 0, 0, 0)):
    """One fixed colour per schema class (QC overlays and sample montages agree)."""
    cols = (LABEL_COLOURS * (n // len(LABEL_COLOURS) + 1))[:n]
    cols[0] = background
    return ListedColormap(cols)


def _mid_slices(vol, mask=None):
    """Axial, coronal and sagittal slices through the mask centre (or the volume centre)."""
    if mask is not None and np.asarray(mask).any():
        c = [int(round(x)) for x in np.argwhere(mask).mean(axis=0)]
    else:
        c = [s // 2 for s in vol.shape[:3]]
    return [np.rot90(vol[:, :, c[2]]), np.rot90(vol[:, c[1], :]), np.rot90(vol[c[0], :, :])]


def subject_montage(out_png, subject, native_t1, native_mask, grid_images, grid_label=None,
                    n_classes=10, dice=None):
    """Rows: native T1 + mask outline; each working-grid modality; label overlay."""
    t1 = np.asanyarray(nib.load(str(native_t1)).dataobj).astype(np.float32)
    m = np.asanyarray(nib.load(str(native_mask)).dataobj) > 0
    rows = [("native T1 + mask", _mid_slices(t1, m), _mid_slices(m.astype(float), m), "contour")]
    lab = None
    if grid_label:
        lab = np.asanyarray(nib.load(str(grid_label)).dataobj).astype(np.int16)
    for mod, path in grid_images.items():
        img = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
        rows.append((f"{mod} (working grid)", _mid_slices(img), None, None))
    if lab is not None:
        first = np.asanyarray(nib.load(str(next(iter(grid_images.values())))).dataobj)
        rows.append(("labels", _mid_slices(first.astype(np.float32)), _mid_slices(lab), "labels"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (title, base, over, kind) in enumerate(rows):
        for c in range(3):
            ax = axes[r, c]
            ax.imshow(base[c], cmap="gray", interpolation="nearest")
            if kind == "contour":
                ax.contour(over[c], levels=[0.5], colors="r", linewidths=0.8)
            elif kind == "labels":
                ax.imshow(np.ma.masked_equal(over[c], 0), cmap=label_cmap(n_classes),
                          vmin=0, vmax=n_classes - 1, alpha=0.6, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    head = subject if dice is None else f"{subject}  skull-strip Dice {dice:.3f}"
    fig.suptitle(head, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_png, dpi=80)


def qc_table(json_paths, out_tsv, min_dice=None):
    """Gather per-subject QC records into one TSV, flagging masks below ``min_dice``."""
    recs = [json.loads(open(p).read()) for p in json_paths]
    df = pd.DataFrame.from_records(recs).sort_values("subject")
    df = df[["subject"] + [c for c in df.columns if c != "subject"]]
    if min_dice is not None and "skull_strip_dice" in df:
        d = pd.to_numeric(df["skull_strip_dice"], errors="coerce")
        df["skull_strip_pass"] = np.where(d.isna(), "", np.where(d >= min_dice, "yes", "no"))
    save_table(df, out_tsv)
    return df
