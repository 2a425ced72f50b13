"""Where the label VAE loses CSF (not a test; the README's "Argmax targets outside lesions"):
recall of the held-out maps' CSF voxels by the size of their 6-connected CSF component, the
CSF decoded where there is none, and the CSF Dice, decoded as the audit decodes.

    .venv/bin/python benchmarks/label_vae_csf.py --results results/brainspade-demo \
        --vae results/brainspade-demo/generators/label_generator/label_vae.pt \
        --calibration results/brainspade-demo/generators/label_generator/label_vae_calibration.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from brainsynth.generators import label_quality as LQ  # noqa: E402
from brainsynth.labels import LabelSchema  # noqa: E402

SIZES = {"1": (1, 1), "2-4": (2, 4), "5-49": (5, 49), ">=50": (50, None)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="results/<experiment> folder with preprocessing done")
    ap.add_argument("--vae", required=True, help="a label_vae.pt")
    ap.add_argument("--calibration", default=None, help="its calibration JSON (default: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = Path(args.results)
    split = pd.read_csv(res / "preprocessing" / "input_check.tsv", sep="\t", dtype={"subject": str})
    held = {s: str(res / "preprocessing" / "subjects" / s / "grid" / "tissue_prob.nii.gz")
            for s in split.loc[split["split"] == "test", "subject"]}
    schema = LabelSchema()
    csf_value = schema.value("csf")
    rows, given, decoded = LQ.reconstruct(args.vae, held, schema.names, "held_out", calibration=args.calibration)
    total, kept = dict.fromkeys(SIZES, 0), dict.fromkeys(SIZES, 0)
    false = true = 0
    for g, d in zip(given, decoded):
        csf = g == csf_value
        comp, _ = ndi.label(csf)
        size = np.bincount(comp.ravel())[comp]
        for k, (lo, hi) in SIZES.items():
            m = csf & (size >= lo) & (size <= (hi or size.max()))
            total[k] += int(m.sum())
            kept[k] += int((m & (d == csf_value)).sum())
        false += int(((d == csf_value) & ~csf).sum())
        true += int(csf.sum())
    print(f"{len(held)} held-out maps, {true} CSF voxels; by 6-connected component size: share / recall")
    for k in SIZES:
        print(f"  {k:>5}: {total[k] / true:.2f} / {kept[k] / max(1, total[k]):.2f}")
    dice = np.mean([r["dice"] for r in rows if r["class"] == "csf" and r["voxels_in"]])
    print(f"CSF decoded where there is none / true CSF voxels: {false / true:.2f}; mean CSF Dice {dice:.3f}")


if __name__ == "__main__":
    main()
