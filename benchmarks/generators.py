"""Benchmark: generator training step time, sampling time per volume and peak memory.

Not a test: prints a table. For each grid (demo 48x56x48 with the DEFAULTS networks,
paper 96x128x96 with the PAPER networks) it runs the package's real training functions
(label VAE, label LDM, SPADE image generator, SPADE diffusion image generator) for a few
steps on smooth random label maps, then samples label maps with DDIM and DDPM and generates
T1/T2/FLAIR from them with both image generators. The two training-free generators (gmm,
lesion_insertion) run on numpy only; the generator benchmark rule times them. Every case
runs in its own process so that its peak resident memory (and, on a GPU, peak allocated
GPU memory) is its own.

    .venv/bin/python benchmarks/generators.py                 # both grids, auto device
    .venv/bin/python benchmarks/generators.py --grid demo --device cpu --steps 10
    .venv/bin/python benchmarks/generators.py --grid demo --guidance 3   # as the demo samples

Label sampling runs at ``--guidance`` (default 1: one U-Net pass per denoising step; above 1,
classifier-free guidance adds the unconditioned pass, so a step costs about twice as much).

Step times are medians over the measured steps (the first steps, which include warm-up,
are dropped). DDPM runs all training timesteps; with ``--ddpm-steps-measured K`` (default on
CPU at the paper grid) only K denoising steps run and the time per volume is extrapolated
from the time per step: such rows say "extrapolated".
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRIDS = {"demo": (48, 56, 48), "paper": (96, 128, 96)}
VOXEL_MM = {"demo": 4.0, "paper": 2.0}
CASES = ("label_vae", "label_ldm", "image_generator", "spade_diffusion", "sample_labels", "generate_images",
         "spade_diffusion_images")


def make_inputs(root, grid, n_subjects=4, seed=0):
    """Smooth random K-class probabilistic maps + images + a conditioning table, on disk."""
    import nibabel as nib
    import pandas as pd
    from scipy.ndimage import gaussian_filter

    from brainsynth.labels import LabelSchema

    k = LabelSchema().n_classes
    shape = GRIDS[grid]
    aff = np.diag([VOXEL_MM[grid]] * 3 + [1.0])
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels, images, rows = [], {"t1": [], "t2": [], "flair": []}, []
    centre = np.array(shape) / 2
    grid_idx = np.indices(shape).transpose(1, 2, 3, 0)
    head = (((grid_idx - centre) / (centre * 0.8)) ** 2).sum(-1) < 1.0
    for i in range(n_subjects):
        sid = f"bench{i:02d}"
        logits = gaussian_filter(rng.normal(size=(k,) + shape), sigma=(0, 3, 3, 3)) * 20
        logits[0][~head] = 50.0
        prob = np.exp(logits - logits.max(0, keepdims=True))
        prob /= prob.sum(0, keepdims=True)
        p = root / f"{sid}_tissue_prob.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(prob, 0, -1).astype(np.float32), aff), p)
        labels.append(str(p))
        for j, mod in enumerate(images):
            img = (prob * np.linspace(0, 1, k)[np.roll(np.arange(k), j)][:, None, None, None]).sum(0)
            q = root / f"{sid}_{mod}.nii.gz"
            nib.save(nib.Nifti1Image(img.astype(np.float32), aff), q)
            images[mod].append(str(q))
        rows.append({"subject": sid, "dc_wmh": rng.uniform(0, 1), "dc_tumour": rng.uniform(0, 1)})
    cond = root / "lesion_proportions.tsv"
    pd.DataFrame(rows).to_csv(cond, sep="\t", index=False)
    return {"labels": labels, "images": images, "conditioning": str(cond)}


def _config(grid, module):
    from brainsynth.generators import common as C

    return C.merge_config(module.DEFAULTS, module.PAPER if grid == "paper" else {}, where="benchmark")


def _peak():
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _timed_training(train, *args, **kwargs):
    stamps = []
    t0 = time.perf_counter()
    train(*args, callback=lambda step: stamps.append(time.perf_counter()), **kwargs)
    total = time.perf_counter() - t0
    diffs = np.diff([t0] + stamps)
    measured = diffs[min(2, len(diffs) - 1):]
    return {"step_s": float(np.median(measured)), "steps": len(stamps), "total_s": total}


def run_case(case, grid, device, steps, work, ddpm_measured, guidance=1.0, image_steps=None):
    """One measurement in this process; returns a dict (printed as JSON by the child)."""
    from brainsynth.generators.brainspade import image_generator as IG
    from brainsynth.generators.brainspade import label_generator as LG
    from brainsynth.generators import spade_diffusion as SD

    work = Path(work)
    inputs = json.loads((work / "inputs.json").read_text())
    lcfg = _config(grid, LG)
    lcfg.update(device=device, checkpoint_every=10**9, log_every=10**9)
    lcfg["vae"].update(steps=steps, adv_warmup_steps=0, perceptual_weight=0.0)  # full loss from step 1
    lcfg["ldm"].update(steps=steps)
    lcfg["sampling"]["batch_size"] = 1
    icfg = _config(grid, IG)
    icfg.update(device=device, steps=steps, checkpoint_every=10**9, log_every=10**9)
    icfg["weights"] = dict(icfg["weights"], perceptual=0.0, modality=icfg["weights"].get("modality", 0.0))
    scfg = SD.resolve_config({"preset": "paper" if grid == "paper" else "demo", "device": device, "steps": steps,
                              "checkpoint_every": 10**9, "log_every": 10**9})
    out = {}
    if case == "label_vae":
        out = _timed_training(LG.train_label_vae, inputs["labels"], lcfg, work / "label")
    elif case == "label_ldm":
        out = _timed_training(LG.train_label_ldm, work / "label" / "label_vae.pt", inputs["labels"],
                              inputs["conditioning"], lcfg, work / "label")
    elif case == "image_generator":
        out = _timed_training(IG.train_image_generator, inputs["labels"], inputs["images"], icfg,
                              work / "image")
    elif case == "spade_diffusion":
        out = _timed_training(SD.train_spade_diffusion, inputs["labels"], inputs["images"], scfg,
                              work / "spade_diffusion")
        out["batch_size"] = scfg["batch_size"]
    elif case == "sample_labels":
        vae, ldm = work / "label" / "label_vae.pt", work / "label" / "label_ldm.pt"
        cond = np.array([[0.5, 0.5]], dtype=np.float32)
        guided = {"guidance_scale": guidance}
        LG.sample_labels(vae, ldm, cond, scheduler="ddim", steps=2, device=device, progress=False,
                         sampling=guided)  # warm-up
        for kind, n_steps in (("ddim", 10), ("ddim", 50)):
            t0 = time.perf_counter()
            LG.sample_labels(vae, ldm, cond, scheduler=kind, steps=n_steps, device=device, progress=False,
                             sampling=guided)
            out[f"{kind}{n_steps}_s"] = time.perf_counter() - t0
        per_step = (out["ddim50_s"] - out["ddim10_s"]) / 40
        T = int(lcfg["ldm"]["num_train_timesteps"])
        if ddpm_measured:
            out["ddpm_s"] = out["ddim10_s"] + per_step * (T - 10)
            out["ddpm_extrapolated"] = True
        else:
            t0 = time.perf_counter()
            LG.sample_labels(vae, ldm, cond, scheduler="ddpm", device=device, progress=False,
                             sampling=guided)
            out["ddpm_s"] = time.perf_counter() - t0
            out["ddpm_extrapolated"] = False
        out["denoise_step_s"] = per_step
        out["ddpm_steps"] = T
        out["guidance"] = guidance
    elif case == "generate_images":
        import nibabel as nib

        prob = np.moveaxis(np.asarray(nib.load(inputs["labels"][0]).dataobj, dtype=np.float32), -1, 0)
        styles = {m: np.asarray(nib.load(p[1]).dataobj, dtype=np.float32) for m, p in inputs["images"].items()}
        IG.generate_images(work / "image" / "image_generator.pt", prob, styles, device=device)  # warm-up
        t0 = time.perf_counter()
        IG.generate_images(work / "image" / "image_generator.pt", prob, styles, device=device)
        out["per_volume_s"] = time.perf_counter() - t0  # all modalities of one subject
        out["modalities"] = len(styles)
    elif case == "spade_diffusion_images":
        import nibabel as nib

        net, payload = SD.load_model(work / "spade_diffusion" / "spade_diffusion.pt", device)
        prob = np.moveaxis(np.asarray(nib.load(inputs["labels"][0]).dataobj, dtype=np.float32), -1, 0)
        SD.generate_volume(net, payload, prob, "t1", 0, steps=2, device=device)  # warm-up
        t0 = time.perf_counter()
        for m in payload["modalities"]:
            SD.generate_volume(net, payload, prob, m, 0, device=device, steps=image_steps)
        out["per_volume_s"] = time.perf_counter() - t0
        out["modalities"] = len(payload["modalities"])
        out["ddim_steps"] = int(image_steps or payload["config"]["inference_steps"])
    out.update(_peak())
    return out


def child(args):
    res = run_case(args.case, args.grid, args.device, args.steps, args.work, args.ddpm_steps_measured,
                   args.guidance, args.image_ddim_steps)
    print("RESULT " + json.dumps(res), flush=True)


def spawn(case, grid, device, steps, work, ddpm_measured, guidance, image_steps=None):
    cmd = [sys.executable, __file__, "--child", case, "--grid", grid, "--device", device, "--steps", str(steps),
           "--work", str(work), "--guidance", str(guidance)]
    if image_steps:
        cmd += ["--image-ddim-steps", str(image_steps)]
    if ddpm_measured:
        cmd.append("--ddpm-steps-measured")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"[{grid}] {case} FAILED:\n{(proc.stdout + proc.stderr)[-4000:]}", flush=True)
    return None


def fmt_mem(r):
    gpu = f", GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""
    return f"RSS {r['peak_rss_mb']:.0f} MB{gpu}"


def _guided(r):
    return f", guidance {r['guidance']:g}" if r.get("guidance", 1.0) != 1.0 else ""


def table_rows(shape, res):
    """(grid, what, time, memory) rows of one grid's results; a failed case reads FAILED."""
    def row(case, what, fmt, with_mem=True):
        r = res.get(case)
        if r is None:
            return (shape, what if isinstance(what, str) else case, "FAILED", "")
        label = what if isinstance(what, str) else what(r)
        return (shape, label, fmt(r), fmt_mem(r) if with_mem else "")

    rows = [row(name, lambda r, n=name: f"train {n}" + (f" (batch {r['batch_size']} slices)"
                                                         if "batch_size" in r else ""),
                lambda r: f"{r['step_s']:.3f} s/step")
            for name in ("label_vae", "label_ldm", "image_generator", "spade_diffusion")]
    rows += [row("sample_labels", lambda r: f"sample label map, DDIM 10 steps{_guided(r)}",
                 lambda r: f"{r['ddim10_s']:.2f} s/volume"),
             row("sample_labels", lambda r: f"sample label map, DDIM 50 steps{_guided(r)}",
                 lambda r: f"{r['ddim50_s']:.2f} s/volume", False),
             row("sample_labels", lambda r: f"sample label map, DDPM {r['ddpm_steps']} steps{_guided(r)}",
                 lambda r: f"{r['ddpm_s']:.1f} s/volume" + (" (extrapolated)" if r["ddpm_extrapolated"] else ""),
                 False),
             row("generate_images", lambda r: f"generate images ({r['modalities']} modalities)",
                 lambda r: f"{r['per_volume_s']:.2f} s/subject"),
             row("spade_diffusion_images",
                 lambda r: f"spade_diffusion images ({r['modalities']} modalities, DDIM {r['ddim_steps']})",
                 lambda r: f"{r['per_volume_s']:.2f} s/subject")]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=["demo", "paper", "both"], default="both")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--steps", type=int, default=8, help="training steps per network (first 2 not timed)")
    ap.add_argument("--ddpm-steps-measured", action="store_true",
                    help="extrapolate DDPM from the DDIM per-step time instead of running all timesteps")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="classifier-free guidance scale of label sampling (config: label_generator.sampling)")
    ap.add_argument("--image-ddim-steps", type=int, default=None,
                    help="DDIM steps of the spade_diffusion images (default: the model's own, 25 in the demo "
                         "preset); the CPU form of gpu_check.sh takes 5, since each step runs every slice")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.case = args.child
        return child(args)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"generator benchmark on {where}, torch {torch.__version__}, {args.steps} training steps per network")
    grids = ["demo", "paper"] if args.grid == "both" else [args.grid]
    rows = []
    for grid in grids:
        extrapolate = args.ddpm_steps_measured or (grid == "paper" and device == "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            (work / "inputs.json").write_text(json.dumps(make_inputs(work / "data", grid)))
            print(f"[{grid}] inputs {GRIDS[grid]} written in {time.perf_counter() - t0:.1f} s", flush=True)
            res = {}
            for case in CASES:
                res[case] = spawn(case, grid, device, args.steps, work, extrapolate, args.guidance,
                                  args.image_ddim_steps)
                if res[case] is not None:
                    print(f"[{grid}] {case}: {json.dumps(res[case])}", flush=True)
        rows += table_rows("x".join(map(str, GRIDS[grid])), res)
    widths = [max(len(r[i]) for r in rows + [("grid", "what", "time", "peak memory")]) for i in range(4)]
    print()
    for r in [("grid", "what", "time", "peak memory")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if any(r[2] == "FAILED" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
