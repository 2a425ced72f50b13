"""Image generator levers: train the SPADE image generator with config overrides on a
preprocessed cohort and print how well held-out subjects are re-imaged (not a test; the
README's lever table).

Each held-out subject's own probabilistic label map is imaged with its own image volume as
the style (slice z styles slice z, as sampling does), so the output has a paired real
image: per modality and class the mean intensity synthetic vs real, whether each class
keeps its order against white matter, the lesion-to-WM contrast, and the brain MAE.

    .venv/bin/python benchmarks/image_generator_levers.py --results results/brainspade-demo \
        --site site_a --out /tmp/img_levers/default                # today's DEFAULTS
    .venv/bin/python benchmarks/image_generator_levers.py --results results/brainspade-demo \
        --site site_a --out /tmp/img_levers/before \
        --cfg '{"steps": 500, "rare_class_oversample": 0, "weights": {"class_l1": 0}}'   # before the levers
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from brainsynth.generators import common as C  # noqa: E402
from brainsynth.generators.brainspade import image_generator as IG  # noqa: E402
from brainsynth.labels import LabelSchema  # noqa: E402

LESIONS = ("wmh", "necrotic", "oedema", "enhancing")


def reimage_table(model, held, modalities, names):
    """Rows (subject, modality, class, synthetic, real) of per-class mean intensity, plus the
    brain MAE per (subject, modality) as class ``brain_mae``; and per modality the excess
    (synthetic - real) outside lesions, averaged voxel by voxel over the subjects."""
    net, payload = IG.load_generator(model, "cpu")
    rows, excess = [], {m: [] for m in modalities}
    for s, paths in held.items():
        prob = C.load_prob_label(paths["tissue"])
        hard = np.argmax(prob, axis=0)
        real = {m: C.load_image(paths[m]) for m in modalities}
        fake = IG.generate_images(model, prob, real, seed=0, device="cpu", net=net, payload=payload)
        brain = hard > 0
        tissue = brain & ~np.isin(hard, [names.index(c) for c in LESIONS if c in names])
        for m in modalities:
            excess[m].append(np.where(tissue, fake[m] - real[m], np.nan))
            rows.append({"subject": s, "modality": m, "class": "brain_mae",
                         "synthetic": float(np.abs(fake[m][brain] - real[m][brain]).mean()), "real": 0.0})
            for c, n in enumerate(names[1:], start=1):
                sel = hard == c
                if sel.sum() >= 5:
                    rows.append({"subject": s, "modality": m, "class": n, "synthetic": float(fake[m][sel].mean()),
                                 "real": float(real[m][sel].mean())})
    return pd.DataFrame(rows), {m: np.nanmean(np.stack(v), axis=0) for m, v in excess.items()}


def fixed_artifacts(excess, threshold=0.3):
    """Per modality: the largest voxel-wise mean excess over the subjects and the voxels whose
    mean excess passes ``threshold``: a bright spot drawn at the same place in every subject
    (what a lesion model then reads as a lesion) rather than noise that averages out."""
    rows = []
    for m, e in excess.items():
        with np.errstate(invalid="ignore"):
            rows.append({"modality": m, "max_mean_excess": round(float(np.nanmax(e)), 3),
                         f"voxels_over_{threshold}": int(np.nansum(e > threshold)),
                         "at": tuple(int(i) for i in np.unravel_index(np.nanargmax(e), e.shape))})
    return pd.DataFrame(rows)


def summarise(df):
    """Per modality and class: means, |error|; per modality: order agreement vs WM and lesion contrast."""
    per = df.groupby(["modality", "class"])[["synthetic", "real"]].mean()
    per["abs_err"] = (df.assign(e=(df["synthetic"] - df["real"]).abs()).groupby(["modality", "class"])["e"].mean())
    lines = []
    for m, g in per.groupby(level=0):
        g = g.droplevel(0)
        wm = g.loc["wm"]
        classes = [c for c in g.index if c not in ("wm", "brain_mae")]
        same = [c for c in classes if np.sign(g.loc[c, "synthetic"] - wm["synthetic"])
                == np.sign(g.loc[c, "real"] - wm["real"])]
        les = [c for c in classes if c in LESIONS]
        contrast = {c: (round(g.loc[c, "synthetic"] - wm["synthetic"], 3), round(g.loc[c, "real"] - wm["real"], 3))
                    for c in les}
        lines.append({"modality": m, "brain_mae": round(g.loc["brain_mae", "synthetic"], 4),
                      "class_abs_err": round(g.loc[classes + ["wm"], "abs_err"].mean(), 4),
                      "lesion_abs_err": round(g.loc[les, "abs_err"].mean(), 4) if les else float("nan"),
                      "order_same": f"{len(same)}/{len(classes)}",
                      "lesion_minus_wm(syn,real)": contrast})
    return per, pd.DataFrame(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="results/<experiment> folder with preprocessing done")
    ap.add_argument("--out", required=True, help="folder for the model and tables")
    ap.add_argument("--cfg", default="{}", help="image_generator overrides (JSON)")
    ap.add_argument("--site", default=None, help="only subjects of these sites, comma-separated (the generator's training pool)")
    ap.add_argument("--held-out", type=int, default=12, help="held-out subjects to re-image")
    ap.add_argument("--modalities", default="t1,t2,flair")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    res, out = Path(args.results), Path(args.out)
    mods = args.modalities.split(",")
    table = pd.read_csv(res / "preprocessing" / "input_check.tsv", sep="\t", dtype={"subject": str})
    if args.site:
        table = table[table["site"].isin(args.site.split(","))]
    grid = lambda s, f: str(res / "preprocessing" / "subjects" / s / "grid" / f)  # noqa: E731
    train = list(table.loc[table["split"] == "train", "subject"])
    held = {s: {"tissue": grid(s, "tissue_prob.nii.gz"), **{m: grid(s, f"{m}.nii.gz") for m in mods}}
            for s in list(table.loc[table["split"] == "test", "subject"])[:args.held_out]}
    cfg = {"device": "cpu", "num_threads": args.threads, "checkpoint_every": 10**9, "log_every": 10**9,
           **json.loads(args.cfg)}
    model = out / "image_generator.pt"
    t0 = time.time()
    if not model.exists():
        IG.train_image_generator([grid(s, "tissue_prob.nii.gz") for s in train],
                                 {m: [grid(s, f"{m}.nii.gz") for s in train] for m in mods}, cfg, out)
    print(f"image generator {args.cfg}: {len(train)} training subjects, trained in {time.time() - t0:.0f} s")
    df, excess = reimage_table(model, held, mods, LabelSchema().names)
    df.to_csv(out / "reimage.tsv", sep="\t", index=False)
    per, summary = summarise(df)
    with pd.option_context("display.width", 250, "display.max_colwidth", 200):
        print(per.round(3).unstack(0).to_string())
        print(summary.to_string(index=False))
        print(fixed_artifacts(excess).to_string(index=False))


if __name__ == "__main__":
    main()
