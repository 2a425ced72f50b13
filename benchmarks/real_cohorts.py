"""Benchmark: one demo subject prepared three ways, as real cohorts deliver it.

Not a test: prints a table. For each subject: the images as delivered (skull, one grid),
with the FLAIR on a 4.5 mm oblique grid of its own and moved by head motion
(:func:`brainsynth.demo.own_grid_copy`), and skull-stripped as BraTS ships them
(:func:`brainsynth.demo.skull_stripped_copy`), each preprocessed with the workflow's
function and the default config. Columns:

* ``coreg dice``: head-mask Dice of the FLAIR with the T1, before (headers alone) -> after
  rigid co-registration; ``flair r``: correlation of the moved FLAIR's working-grid image
  with the one from the shared grid, inside the brain;
* ``ss dice``: skull-strip Dice against the demo's true brain mask, unstripped / stripped;
* ``vol L``: brain volume, unstripped / stripped, and their difference; ``eroded``: the
  stripped copy's volume when its mask is propagated from the template anyway (detection off);
* ``mask dice``: Dice of the stripped copy's brain mask with the unstripped one, native
  grid / working grid;
* ``s``: seconds per preprocessing run (raw / moved / stripped / eroded, one ITK thread).

    .venv/bin/python benchmarks/real_cohorts.py --subjects 6 [--threshold 0.5]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from brainsynth import demo
from brainsynth import preprocess as pp
from brainsynth import template as tpl
from brainsynth.labels import LabelSchema

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=6, help="first N subjects of the demo plan")
    ap.add_argument("--threshold", type=float, default=None, help="skull_strip.threshold (default: config)")
    args = ap.parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    schema = LabelSchema.from_config(config)
    cfg = config["preprocessing"]
    if args.threshold is not None:
        cfg["skull_strip"]["threshold"] = args.threshold
    pp.set_threads(1)
    plan = demo.plan_cohort(config["demo"], config["seed"]).set_index("subject", drop=False)
    print(f"skull_strip.threshold {cfg['skull_strip']['threshold']}, grid {config['grid']}")
    print("subject  site    coreg dice     flair r  ss dice       vol L              eroded  mask dice      s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = {k: root / "template" / f"{k}.nii.gz" for k in ("t1", "brain_mask", "labels")}
        tpl.build_template(config["grid"]["voxel_mm"], config["grid"]["shape"], template, schema)
        for subject in list(plan.index)[: args.subjects]:
            d = root / subject
            raw = {k: d / "raw" / f"{k}.nii.gz" for k in ("t1", "t2", "flair", "label", "brain_mask")}
            for p in raw.values():
                p.parent.mkdir(parents=True, exist_ok=True)
            demo.synthesize_subject(plan.loc[subject].to_dict(), config["demo"], schema, config["seed"], raw)
            stripped = {m: demo.skull_stripped_copy(raw[m], raw["brain_mask"], d / "stripped" / f"{m}.nii.gz")
                        for m in ("t1", "t2", "flair")}
            demo.own_grid_copy(raw["flair"], d / "moved" / "flair.nii.gz")
            variants = {"raw": {m: raw[m] for m in ("t1", "t2", "flair")},
                        "moved": {"t1": raw["t1"], "t2": raw["t2"], "flair": d / "moved" / "flair.nii.gz"},
                        "stripped": stripped}
            no_detection = dict(cfg, skull_strip=dict(cfg["skull_strip"], detect_pre_stripped=False))
            runs = [(name, images, cfg) for name, images in variants.items()] + [("eroded", stripped, no_detection)]
            qc, secs = {}, []
            for name, images, settings in runs:
                t0 = time.monotonic()
                qc[name] = pp.preprocess_subject(subject, images, d / "out" / name, template, settings, schema,
                                                 label=raw["label"], truth_mask=raw["brain_mask"],
                                                 seed=config["seed"])
                secs.append(time.monotonic() - t0)

            def load(name, kind, m=None):
                return np.asanyarray(nib.load(pp.subject_file(d / "out" / name, kind, m)).dataobj)

            co = json.loads(pp.subject_file(d / "out" / "moved", "coregistration_qc").read_text())["modalities"]
            brain = load("raw", "brain_mask") > 0
            r = np.corrcoef(load("moved", "image", "flair")[brain], load("raw", "image", "flair")[brain])[0, 1]
            v_raw, v_str = qc["raw"]["brain_volume_ml"] / 1000, qc["stripped"]["brain_volume_ml"] / 1000
            native = pp.dice(load("raw", "native_mask") > 0, load("stripped", "native_mask") > 0)
            grid = pp.dice(brain, load("stripped", "brain_mask") > 0)
            print(f"{subject}  {plan.loc[subject, 'site']}  "
                  f"{co['flair']['before']['mask_dice']:.3f}->{co['flair']['after']['mask_dice']:.3f}  {r:.3f}    "
                  f"{qc['raw']['skull_strip_dice']:.3f}/{qc['stripped']['skull_strip_dice']:.3f}  "
                  f"{v_raw:.2f}/{v_str:.2f} ({100 * (v_str - v_raw) / v_raw:+.1f}%)  "
                  f"{qc['eroded']['brain_volume_ml'] / 1000:.2f}    "
                  f"{native:.3f}/{grid:.3f}    " + "/".join(f"{s:.1f}" for s in secs), flush=True)


if __name__ == "__main__":
    main()
