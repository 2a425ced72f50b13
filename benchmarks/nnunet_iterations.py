"""Benchmark: nnU-Net v2 training iterations with nnU-Net's own plans (no demo shrinking).

Not a test: prints a table. Builds a small labelled dataset on the chosen grid (demo
48x56x48 at 4 mm, paper 96x128x96 at 2 mm), runs nnU-Net's fingerprint, planning and
preprocessing for one configuration with its default planner and plans, then trains
``--epochs`` epochs of ``--iterations`` iterations with the workflow's trainer plugin and
reports the time per iteration from nnU-Net's time of the last epoch (the first holds
torch.compile's compilation and cudnn's autotuning) and, on a GPU, the peak GPU memory in use
(sampled with nvidia-smi while training runs). ``--compile off`` sets ``nnUNet_compile=false``
(eager); ``nnunet`` leaves nnU-Net's default (torch.compile on CUDA, eager on CPU).

    .venv/bin/python benchmarks/nnunet_iterations.py --grid paper --device cuda --iterations 50
    .venv/bin/python benchmarks/nnunet_iterations.py --grid demo --device cpu --iterations 2 --epochs 1
"""

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from brainsynth import segmentation as seg

GRIDS = {"demo": ((48, 56, 48), 4.0), "paper": ((96, 128, 96), 2.0)}


def make_dataset(root, grid, n_cases=4, seed=0):
    """``n_cases`` smooth random 3-class label maps with two images each (raw nnU-Net cases)."""
    shape, mm = GRIDS[grid]
    aff = np.diag([mm] * 3 + [1.0])
    rng = np.random.default_rng(seed)
    cases = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        field = gaussian_filter(rng.normal(size=shape), 4)
        label = np.digitize(field, np.quantile(field, [0.6, 0.85])).astype(np.uint8)
        files = {}
        for k in range(2):
            img = label * (1.0 + k) + rng.normal(scale=0.3, size=shape)
            files[str(k)] = root / f"case{i}_{k}.nii.gz"
            nib.save(nib.Nifti1Image(img.astype(np.float32), aff), files[str(k)])
        lab = root / f"case{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(label, aff), lab)
        cases.append({"case_id": f"case{i}", "images": files, "label": lab})
    return cases


class GpuMemory:
    """Peak 'memory.used' of GPU 0 from nvidia-smi, sampled every 0.5 s (None without it)."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self.tool = shutil.which("nvidia-smi")

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run([self.tool, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak = max(self.peak or 0, int(out))
            time.sleep(0.5)

    def __enter__(self):
        if self.tool:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="paper")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    ap.add_argument("--epochs", type=int, default=2, help="epochs (the last one is timed)")
    ap.add_argument("--compile", choices=["nnunet", "off"], default="nnunet",
                    help="nnunet: nnU-Net's default (torch.compile on CUDA); off: nnUNet_compile=false")
    args = ap.parse_args()
    device = seg.resolve_device(args.device)
    if args.compile == "off":
        os.environ["nnUNet_compile"] = "false"
    else:
        os.environ.pop("nnUNet_compile", None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        roots = seg.as_roots(root / "nnunet")
        t0 = time.perf_counter()
        cases = make_dataset(root / "data", args.grid)
        seg.assemble_dataset(cases, 901, "Bench", {"0": "t1", "1": "flair"}, {"background": 0, "a": 1, "b": 2},
                             roots.raw)
        seg.plan_and_preprocess(901, roots, configurations=[args.configuration], num_processes=1,
                                log=root / "plan.log")
        plan_s = time.perf_counter() - t0
        log = root / "train.log"
        t0 = time.perf_counter()
        with GpuMemory() as gpu:
            seg.train(901, roots, configuration=args.configuration, epochs=args.epochs,
                      iterations_per_epoch=args.iterations,
                      val_iterations_per_epoch=1, device=device, final_validation=False, log=log)
        train_s = time.perf_counter() - t0
        # nnU-Net's own training log when there is one (the subprocess log repeats its lines)
        logs = sorted(roots.results.rglob("training_log_*.txt")) or [log]
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
        epoch = [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        compiled = "Using torch.compile" in text
        patch = re.findall(r"'patch_size': \[([0-9, ]+)\]", text) or re.findall(r"patch_size.: \[([0-9, ]+)\]", text)
    shape = "x".join(map(str, GRIDS[args.grid][0]))
    per_it = f"{epoch[-1] / args.iterations:.3f} s/iteration" if epoch else "n/a (no epoch time in the log)"
    mem = f"{gpu.peak} MiB (nvidia-smi, whole GPU)" if gpu.peak is not None else ""
    mode = "torch.compile" if compiled else "eager"
    print(f"nnU-Net {args.configuration} on {device} ({mode}), grid {shape}, nnU-Net's own plans"
          + (f" (patch {patch[0]})" if patch else ""))
    print(f"plan + preprocess 4 cases: {plan_s:.1f} s; training {args.epochs} x {args.iterations} iterations: "
          f"{train_s:.1f} s in all (epoch times {', '.join(f'{e:.1f}' for e in epoch)} s)")
    print(f"RESULT nnunet_{args.configuration}_{mode.replace('torch.', '')}  {per_it}  {mem}")


if __name__ == "__main__":
    main()
