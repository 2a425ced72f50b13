"""Benchmark: `snakemake -n` wall time for sample sheets of growing size (all stages, all arms).

Not a test: prints a table. Every subject of the generated sheet has its own files
(hard links to four small NIfTI files, so parse-time existence checks and Snakemake's
own file inventory stat distinct paths), in the default configuration: preprocessing,
generators, synthetic sampling and every segmentation task x arm.

Columns: ``jobs`` planned; ``parse s`` = `snakemake --list-rules` (Python and Snakemake
start-up plus this workflow's parse-time code: sample sheet validation, file existence
checks, experiment design); ``dag s`` = the rest of the dry run (Snakemake building the
DAG, calling the workflow's input functions and params, checking files, printing the
job summary); ``total s`` = `snakemake -n --quiet rules`; ``cpu s`` its user + system CPU
time (less sensitive than wall time to other load on a shared machine).

    .venv/bin/python benchmarks/dag_scale.py 100 1000 10000
"""

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def make_sheet(root, n):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    sources = {}
    for kind in ("t1", "t2", "flair", "label"):
        p = root / f"{kind}.nii.gz"
        if not p.exists():
            arr = np.zeros((8, 8, 8), np.uint8 if kind == "label" else np.float32)
            nib.save(nib.Nifti1Image(arr, aff), p)
        sources[kind] = p
    splits = ["train"] * 8 + ["test"] * 2
    rows = []
    for i in range(n):
        subject = f"sub-{i:05d}"
        d = root / "data" / subject
        d.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind, src in sources.items():
            dst = d / src.name
            if not dst.exists():
                os.link(src, dst)
            files[kind] = str(dst)
        site = i % 3
        rows.append({"subject": subject, "site": "abc"[site], "role": ("in_distribution", "near_ood", "far_ood")[site],
                     "split": splits[i % 10], **files})
    sheet = root / f"subjects_{n}.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


def timed(cmd):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, proc


def main(sizes):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in sizes:
            sheet = make_sheet(root, n)
            cfg = root / "cfg.yaml"
            cfg.write_text(yaml.safe_dump({"samples": str(sheet), "experiment": f"scale{n}"}))
            base = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", tmp, "--configfile", str(cfg)]
            parse_s, _ = timed(base + ["--list-rules"])
            total_s, proc = timed(base + ["-n", "--quiet", "rules"])
            jobs = next((line.split()[-1] for line in proc.stdout.splitlines()
                         if line.startswith("total")), "?")
            rows.append((n, jobs, f"{parse_s:.1f}", f"{total_s - parse_s:.1f}", f"{total_s:.1f}",
                         f"{proc.cpu:.1f}", "ok" if proc.returncode == 0 else "FAILED"))
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
    print(f"{'subjects':>9} {'jobs':>8} {'parse s':>8} {'dag s':>8} {'total s':>8} {'cpu s':>8} status")
    for r in rows:
        print(f"{r[0]:>9} {r[1]:>8} {r[2]:>8} {r[3]:>8} {r[4]:>8} {r[5]:>8} {r[6]}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 10000])
