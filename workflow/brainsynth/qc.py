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
                    n_classes=10, dice=None, anchor="t1"):
    """Rows: native anchor image (the T1, else the subject's first modality) + mask outline;
    each working-grid modality; label overlay."""
    t1 = np.asanyarray(nib.load(str(native_t1)).dataobj).astype(np.float32)
    m = np.asanyarray(nib.load(str(native_mask)).dataobj) > 0
    name = "T1" if anchor == "t1" else anchor.upper()
    rows = [(f"native {name} + mask", _mid_slices(t1, m), _mid_slices(m.astype(float), m), "contour")]
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


def qc_table(json_paths, out_tsv, min_dice=None, coregistration_paths=(), min_coregistration_dice=None):
    """Gather per-subject QC records into one TSV with a pass flag per check and overall.

    ``json_paths``: skull-strip records (method, brain volume, Dice against a reference
    mask where one exists), flagged below ``min_dice``; ``coregistration_paths``: the
    co-registration records, whose worst head-mask Dice over the co-registered modalities
    is flagged below ``min_coregistration_dice``. A check without a value (no reference
    mask, nothing co-registered) passes. ``qc_pass`` is "no" when any check failed, and
    ``qc_failures`` says which.
    """
    recs = {}
    for p in json_paths:
        rec = json.loads(open(p).read())
        recs[rec["subject"]] = rec
    for p in coregistration_paths:
        rec = json.loads(open(p).read())
        recs.setdefault(rec["subject"], {"subject": rec["subject"]})["coregistration_mask_dice"] = \
            rec.get("coregistration_mask_dice")
    df = pd.DataFrame.from_records(list(recs.values())).sort_values("subject").reset_index(drop=True)
    df = df[["subject"] + [c for c in df.columns if c != "subject"]]
    failures = [[] for _ in range(len(df))]
    for column, threshold, flag in (("skull_strip_dice", min_dice, "skull_strip_pass"),
                                    ("coregistration_mask_dice", min_coregistration_dice, "coregistration_pass")):
        if threshold is None or column not in df:
            continue
        d = pd.to_numeric(df[column], errors="coerce")
        df[flag] = np.where(d.isna(), "", np.where(d >= threshold, "yes", "no"))
        for i in np.flatnonzero((d < threshold).to_numpy()):
            failures[i].append(f"{column} {d.iloc[i]:.3f} < {threshold:g}")
    df["qc_pass"] = ["no" if f else "yes" for f in failures]
    df["qc_failures"] = ["; ".join(f) for f in failures]
    save_table(df, out_tsv)
    return df


def failed_subjects(qc_tsv):
    """Subjects whose ``qc_pass`` is "no" in a QC table written by :func:`qc_table`."""
    df = pd.read_csv(qc_tsv, sep="\t", dtype=str, keep_default_na=False)
    return sorted(df.loc[df["qc_pass"] == "no", "subject"]) if "qc_pass" in df else []
