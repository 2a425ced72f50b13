"""Benchmark: `snakemake -n` wall time for sample sheets of growing size (all stages, all arms).

Not a test: prints a table. Every subject of the generated sheet points at the same
small NIfTI files (parse-time checks only test existence), so the time measured is
Snakemake's DAG building plus this workflow's parse-time code.

    .venv/bin/python benchmarks/dag_scale.py 100 1000 10000
"""

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
    files = {}
    for kind in ("t1", "t2", "flair", "label"):
        p = root / f"{kind}.nii.gz"
        if not p.exists():
            arr = np.zeros((8, 8, 8), np.uint8 if kind == "label" else np.float32)
            nib.save(nib.Nifti1Image(arr, aff), p)
        files[kind] = str(p)
    roles = ["train"] * 8 + ["test"] * 2
    df = pd.DataFrame([{"subject": f"sub-{i:05d}", "site": ["a", "b", "c"][i % 3],
                        "split": roles[i % 10], **files} for i in range(n)])
    sheet = root / f"subjects_{n}.tsv"
    df.to_csv(sheet, sep="\t", index=False)
    return sheet


def main(sizes):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in sizes:
            sheet = make_sheet(root, n)
            cfg = root / "cfg.yaml"
            cfg.write_text(yaml.safe_dump({"samples": str(sheet), "experiment": f"scale{n}"}))
            t0 = time.perf_counter()
            proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", tmp,
                                   "--configfile", str(cfg), "-n", "--quiet", "rules"],
                                  capture_output=True, text=True)
            dt = time.perf_counter() - t0
            jobs = next((line.split()[-1] for line in proc.stdout.splitlines()
                         if line.startswith("total")), "?")
            rows.append((n, jobs, f"{dt:.1f}", "ok" if proc.returncode == 0 else "FAILED"))
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
    print(f"{'subjects':>9} {'jobs':>8} {'dry-run s':>10} status")
    for r in rows:
        print(f"{r[0]:>9} {r[1]:>8} {r[2]:>10} {r[3]}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 10000])
