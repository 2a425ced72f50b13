"""Label generator levers: train the label VAE (and optionally the LDM) with config overrides on a
preprocessed cohort and print the fidelity audit (not a test; the README's lever tables).

Uses the workflow's own training and audit functions on the working-grid tissue maps of a
results folder that has been preprocessed (e.g. after `snakemake --until lesion_proportions`):
training subjects = split train, held-out = split test, from the input-check table.

    .venv/bin/python benchmarks/label_generator_levers.py --results results/demo --out /tmp/levers/base \
        --vae '{"vae": {"steps": 1500}}' --ldm '{"ldm": {"steps": 1500}}' --guidance 1,3 --inference-steps 10,25 --per-mode 50 \
        --sampling '{"compose_lesion_types": true}'

``--sampling '{"compose_lesion_types": true, "compose_weight": "fit"}'`` fits the compose weights
first, as the workflow's rule fit_compose_weight does (``compose_weight.json`` beside each audit).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from brainsynth.generators.brainspade import compose_fit as CF  # noqa: E402
from brainsynth.generators.brainspade import label_generator as LG  # noqa: E402
from brainsynth.generators import label_quality as LQ  # noqa: E402
from brainsynth.labels import LabelSchema  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="results/<experiment> folder with preprocessing done")
    ap.add_argument("--out", required=True, help="folder for the models and tables")
    ap.add_argument("--vae", default="{}", help="label_generator overrides for the VAE (JSON)")
    ap.add_argument("--ldm", default=None, help="label_generator overrides for the LDM (JSON); none: VAE only")
    ap.add_argument("--guidance", default="1", help="guidance scales to audit, comma separated")
    ap.add_argument("--inference-steps", default="25", help="DDIM steps to audit, comma separated")
    ap.add_argument("--sampling", default="{}",
                    help="further label_generator.sampling settings for the audit (JSON), e.g. "
                         "'{\"compose_lesion_types\": true}'")
    ap.add_argument("--per-mode", type=int, default=50)
    ap.add_argument("--voxel-mm", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sites", default=None,
                    help="comma-separated sites whose train / test subjects are the training / held-out maps "
                         "(the workflow's training pool, e.g. site_a,site_t); default: every site")
    ap.add_argument("--train-from", default=None,
                    help="a label_ldm.pt of the workflow: train on its subjects (the workflow's training pool) "
                         "instead of every training-split subject")
    ap.add_argument("--calibration", default="none", choices=LG.CALIBRATION_MODES,
                    help="label_generator.calibration: class offsets of the decoder fitted on the training maps "
                         "(the audit decodes with them)")
    ap.add_argument("--verbose", action="store_true", help="the trainers' progress lines (e.g. the VAE's selection scores)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    res, out = Path(args.results), Path(args.out)
    split = pd.read_csv(res / "preprocessing" / "input_check.tsv", sep="\t", dtype={"subject": str})
    if args.sites:
        split = split[split["site"].isin(args.sites.split(","))]
    tissue = lambda s: str(res / "preprocessing" / "subjects" / s / "grid" / "tissue_prob.nii.gz")  # noqa: E731
    pool = (LG.training_subjects(args.train_from) if args.train_from
            else split.loc[split["split"] == "train", "subject"])
    train = {s: tissue(s) for s in pool}
    held = {s: tissue(s) for s in split.loc[split["split"] == "test", "subject"]}
    base = {"device": "cpu", "num_threads": args.threads, "checkpoint_every": 10**9, "log_every": 10**9}
    schema = LabelSchema()

    vae_path = out / "vae" / "label_vae.pt"
    t0 = time.time()
    if not vae_path.exists():
        LG.train_label_vae(list(train.values()), {**base, **json.loads(args.vae)}, out / "vae")
    print(f"label VAE {args.vae}: {len(train)} training maps, trained in {time.time() - t0:.0f} s")
    calibration = out / f"calibration_{args.calibration}.json"
    t0 = time.time()
    cal = LG.calibrate_label_vae(vae_path, list(train.values()), args.calibration, calibration, schema=schema,
                                 device="cpu", num_threads=args.threads)
    if cal["class_offsets"] is not None:
        print(f"calibration {args.calibration}: offsets {cal['class_offsets']}, training maps "
              f"{cal['score_before']:.4f} -> {cal['score_after']:.4f}, {time.time() - t0:.0f} s")
    rows = (LQ.reconstruct(vae_path, train, schema.names, "train", calibration=calibration)[0]
            + LQ.reconstruct(vae_path, held, schema.names, "held_out", calibration=calibration)[0])
    gate = LQ.reconstruction_gate(rows, schema).set_index("class")
    gate["train_dice"] = LQ.reconstruction_gate(rows, schema, split="train").set_index("class")["dice_mean"]
    print(gate[["dice_mean", "train_dice", "volume_ratio", "created_in_healthy", "threshold", "pass"]]
          .round(3).to_string())
    if args.ldm is None:
        return
    ldm_dir = out / "ldm"
    t0 = time.time()
    if not (ldm_dir / "label_ldm.pt").exists():
        LG.train_label_ldm(vae_path, list(train.values()), res / "preprocessing" / "lesion_proportions.tsv",
                           {**base, **json.loads(args.ldm)}, ldm_dir, subjects=list(train))
    print(f"label LDM {args.ldm}: trained in {time.time() - t0:.0f} s")
    for g in (float(x) for x in args.guidance.split(",")):
        for k in (int(x) for x in args.inference_steps.split(",")):
            t0 = time.time()
            where = out / f"guidance{g:g}_ddim{k}"
            paths = {n: where / f"{n}.tsv" for n in ("reconstruction", "gate", "adherence", "samples", "fidelity")}
            paths["figure"] = where / "adherence.png"
            samp = {**json.loads(args.sampling), "guidance_scale": g, "inference_steps": k}
            if samp.get("compose_weight") == "fit":  # as rule fit_compose_weight, at this guidance and steps
                fitted = CF.fit_compose_weights(vae_path, ldm_dir / "label_ldm.pt", where / "compose_weight.json",
                                                sampling=samp, calibration=calibration, schema=schema, device="cpu",
                                                num_threads=args.threads)
                print(f"compose weight fitted in {time.time() - t0:.0f} s: {fitted['compose_weight']}")
                samp = LG.resolve_compose_weight(samp, where / "compose_weight.json")
            fid = LQ.evaluate_label_generator(vae_path, ldm_dir / "label_ldm.pt", train, held, paths,
                                              n_per_mode=args.per_mode, schema=schema, voxel_mm=args.voxel_mm,
                                              sampling=samp, device="cpu", calibration=calibration)
            print(f"guidance {g:g}, DDIM {k} steps: audit in {time.time() - t0:.0f} s")
            with pd.option_context("display.width", 200):
                print(fid[fid["group"] != "reconstruction"][["measure", "value", "target", "pass", "n", "note"]]
                      .to_string(index=False))


if __name__ == "__main__":
    main()
