"""Benchmark: the workflow's HD95 definitions against panoptica's on a run's predictions.

Not a test: prints a table. For every prediction of one task in a results folder
(``segmentation/<task>/<arm>/predictions/<test set>/<subject>.nii.gz``) it scores the
mask of one task label (nnU-Net's output, default 1) against the subject's preprocessed
label map's classes of that label with
``brainsynth.metrics.hd95`` (``monai``: larger of the two directed 95th percentiles, the
workflow's default; ``brats``: 95th percentile of both directions pooled) and with
panoptica's ``_compute_hausdorff_distance95`` (the metric library of the official BraTS
evaluation), and Dice with both. Cases where either mask is empty are counted, not scored.

panoptica is not part of the workflow's environment (its pins, numpy < 2.3 and pandas < 3,
conflict with the lock); install it beside it, without its dependencies::

    .venv/bin/python -m pip install --target /tmp/panoptica --no-deps panoptica==2.1.7 ruamel.yaml typer plotly
    PYTHONPATH=/tmp/panoptica .venv/bin/python benchmarks/hd95_vs_panoptica.py \\
        results/brainspade-demo --task tumour --classes necrotic oedema enhancing
"""

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from brainsynth.labels import LabelSchema  # noqa: E402
from brainsynth.metrics import hd95  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results/<experiment> folder of a finished run")
    ap.add_argument("--task", required=True)
    ap.add_argument("--classes", nargs="+", required=True, help="schema classes of the task label")
    ap.add_argument("--label", type=int, default=1, help="task label in the predictions (default 1)")
    args = ap.parse_args()
    try:
        from panoptica.metrics.dice import _compute_dice_coefficient
        from panoptica.metrics.hausdorff_distance import _compute_hausdorff_distance95
    except ImportError:
        sys.exit("panoptica is not importable: see this script's docstring for the install line")
    values = [LabelSchema().value(c) for c in args.classes]
    rows, empty = [], 0
    for pred_path in sorted((args.results / "segmentation" / args.task).glob("*/predictions/*/*.nii.gz")):
        subject = pred_path.name[: -len(".nii.gz")]
        truth_path = args.results / "preprocessing" / "subjects" / subject / "grid" / "label.nii.gz"
        img = nib.load(str(truth_path))
        spacing = [float(z) for z in img.header.get_zooms()[:3]]
        truth = np.isin(np.asarray(img.dataobj), values)
        pred = np.asarray(nib.load(str(pred_path)).dataobj) == args.label
        if not truth.any() or not pred.any():
            empty += 1
            continue
        dice = 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())
        rows.append({
            "case": f"{pred_path.parts[-4]}/{pred_path.parts[-2]}/{subject}",
            "dice": dice, "dice_panoptica": float(_compute_dice_coefficient(truth, pred)),
            "monai": hd95(pred, truth, spacing), "brats": hd95(pred, truth, spacing, definition="brats"),
            "panoptica": float(_compute_hausdorff_distance95(truth, pred, voxelspacing=spacing)),
        })
    if not rows:
        sys.exit(f"no prediction with both masks non-empty under {args.results}/segmentation/{args.task}")
    d = {k: np.array([r[k] for r in rows]) for k in rows[0] if k != "case"}

    def agree(a, b, name):
        diff = np.abs(d[a] - d[b])
        differ = diff > 1e-4  # float rounding of the distance transforms
        print(f"{name:34s} equal (1e-4) {int((~differ).sum()):3d} / {len(diff)}; differ {int(differ.sum()):3d}"
              + (f" (median {np.median(diff[differ]):.3g}, max {diff.max():.3g})" if differ.any() else ""))

    print(f"{len(rows)} predictions of task {args.task} with both masks non-empty ({empty} with an empty one "
          "left out)")
    agree("dice", "dice_panoptica", "Dice: workflow vs panoptica")
    agree("brats", "panoptica", "HD95 brats vs panoptica")
    agree("monai", "panoptica", "HD95 monai (default) vs panoptica")
    worst = max(rows, key=lambda r: abs(r["monai"] - r["panoptica"]))
    print(f"largest monai - panoptica gap: {worst['case']} monai {worst['monai']:.2f} mm, "
          f"brats {worst['brats']:.2f} mm, panoptica {worst['panoptica']:.2f} mm")


if __name__ == "__main__":
    main()
