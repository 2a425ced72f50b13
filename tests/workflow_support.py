"""Shared helpers of the workflow tests: tiny demo configs and a real `snakemake` runner.

The configs are small enough for the real tools (ANTs, nnU-Net) to run in minutes on 2 cores.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def demo_sites(n_site_a):
    """The demo's three sites with one subject each at the OOD sites (test only) and
    ``n_site_a`` in-distribution subjects, one of them a test subject."""
    return {
        "site_a": {"role": "in_distribution", "n": n_site_a, "n_test": 1, "noise": 0.02,
                   "voxel_scale": 1.0, "contrast_jitter": 0.05},
        "site_b": {"role": "near_ood", "n": 1, "n_test": 1, "noise": 0.04,
                   "voxel_scale": 1.15, "contrast_jitter": 0.12},
        "site_c": {"role": "far_ood", "n": 1, "n_test": 1, "noise": 0.07,
                   "voxel_scale": 1.3, "contrast_jitter": 0.25},
    }


# A 4-subject demo (each site represented): the whole preprocessing DAG runs for
# real in a few minutes on 2 cores. Generators and segmentation are switched off
# here (they have their own tests), so the DAG is the preprocessing stage alone.
TINY = {
    "experiment": "tiny",
    "synthesis": {"enabled": False},
    "segmentation": {"tasks": []},
    "demo": {"sites": demo_sites(n_site_a=2)},
}


def snakemake_command(workdir, *args, config=None):
    """(argv, env) of a real `snakemake` run on the repository's Snakefile in ``workdir``."""
    # targets and flags first: --configfile takes several values and would swallow a target
    cmd = [SNAKEMAKE, *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    if config is not None:
        cfg = Path(workdir) / "test_config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    return cmd, dict(os.environ, OMP_NUM_THREADS="1")


def run_snakemake(workdir, *args, config=None, check=False, timeout=1500):
    cmd, env = snakemake_command(workdir, *args, config=config)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{out[-6000:]}")
    return proc.returncode, out


def local_rules():
    """Rules Snakemake runs on the submit host, never through a cluster executor: those marked
    `localrule: True` or named in `localrules:`, and those without an action (`all`)."""
    sources = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    text = "\n".join(p.read_text() for p in sources)
    local = set()
    for m in re.finditer(r"^localrules:\s*(.+)$", text, re.M):
        local |= {name.strip() for name in m.group(1).split(",") if name.strip()}
    blocks = re.split(r"^(?=rule \w+:)", text, flags=re.M)
    for block in blocks:
        m = re.match(r"rule (\w+):", block)
        if not m:
            continue
        body = block.split("\n\n\n")[0]  # a rule ends at the next blank-line-separated block
        actions = re.search(r"^\s+(script|shell|run|notebook|wrapper):", body, re.M)
        if re.search(r"^\s+localrule:\s*True", body, re.M) or not actions:
            local.add(m.group(1))
    return local


def planned_jobs(output):
    """Rule -> count from the 'Job stats' table of a dry run."""
    jobs = {}
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    except StopIteration:
        return jobs
    for line in lines[start + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs



TINY_SEG = {
    "experiment": "tinyseg",
    # 3 training subjects (phenotypes tumour, wmh, both): any 2 of them hold both lesion types
    "demo": {"sites": demo_sites(n_site_a=4)},
    # fast preprocessing: affine registration, short N4
    "preprocessing": {"n4": {"shrink_factor": 4, "iterations": [20, 10]},
                      "registration": {"transform": "Affine", "syn_iterations": [10, 0],
                                       "affine_iterations": [100, 50, 0]}},
    "synthesis": {"enabled": False},
    "segmentation": {
        "tasks": ["wmh"],
        "arms": ["R", "Rhalf"],
        # Rhalf also exercises the study's arm keys: an absolute count, its own channel modalities
        "recipes": {"Rhalf": {"n_real": 2, "modalities": ["t2", "t1", "flair"]}},
        # the demo gives wmh more epochs and leaves arms out of it; the tiny config does neither.
        # The far-OOD test set is fed FLAIR in every channel (the study's far-OOD FLAIR-only set)
        "task_definitions": {"wmh": {"nnunet": {"epochs": 2}, "exclude_arms": [],
                                     "test_modalities": {"far_ood": ["flair", "flair", "flair"]}}},
        # one study experiment over both arms (E4's layout: Dice on one test set, FP_tum on another)
        "experiments": ["tiny_e4"],
        "experiment_definitions": {"tiny_e4": {
            "task": "wmh", "arms": ["R", "Rhalf"], "test_sets": ["in_distribution", "near_ood"],
            "metrics": {"in_distribution": ["dice", "recall"], "near_ood": ["fp_tum"]}, "layout": "figure",
            "paper_name": "figure_e4"}},
        "nnunet": {"configuration": "2d", "epochs": 2, "iterations_per_epoch": 4, "val_iterations_per_epoch": 1,
                   "plans_overrides": {"base_features": 4, "max_features": 32, "max_stages": 3, "batch_size": 8}},
        "tables": {"metrics": ["dice", "hd95"]},
    },
}


def seg_config(**seg):
    """TINY_SEG with segmentation keys replaced; its experiment leaves when the arms, tasks or task
    definitions it names change (unless experiments are given too)."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY_SEG))
    cfg["segmentation"].update(seg)
    if {"arms", "tasks", "task_definitions"} & set(seg) and "experiments" not in seg:
        cfg["segmentation"]["experiments"] = []
    return cfg


def jobs_by_rule(out):
    """rule -> sorted list of 'task/arm' (or 'task_metric') of the jobs a dry run plans."""
    found = {}
    for block in re.split(r"\n(?=rule |localrule )", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        w = re.search(r"wildcards: (.*)", block)
        if m:
            found.setdefault(m.group(1), []).append(w.group(1) if w else "")
    return {k: sorted(v) for k, v in found.items()}


def job_blocks(out):
    """(rule, threads, priority) of each job a dry run plans; Snakemake prints threads and
    priority only where they differ from 1 and 0."""
    jobs = []
    for block in re.split(r"\n(?=rule |localrule )", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        threads = re.search(r"^\s+threads: (\d+)", block, re.M)
        priority = re.search(r"^\s+priority: (-?\d+)", block, re.M)
        jobs.append((m.group(1), int(threads.group(1)) if threads else 1,
                     int(priority.group(1)) if priority else 0))
    return jobs


# Preprocessing + both generators + sampling, at the smallest settings that still run
# every generator rule for real (small networks train for a few dozen steps; samples are not
# meant to look good at this budget; the demo-scale networks train in
# test_demo_networks_sample_plausible_tissue_fractions).
TINY_GEN = {
    "experiment": "tinygen",
    "demo": TINY_SEG["demo"],  # 3 training subjects with labels
    "preprocessing": TINY_SEG["preprocessing"],
    "segmentation": {"tasks": []},
    "label_generator": {
        "checkpoint_every": 5,
        "vae": {"steps": 40, "batch_size": 2, "patch_size": [32, 32, 32], "adv_warmup_steps": 10,
                "channels": [8, 16], "norm_num_groups": 4},
        "ldm": {"steps": 30, "batch_size": 2, "channels": [8, 16, 16], "num_head_channels": 4,
                "norm_num_groups": 4},
        # deformation fit: the demo's setting (config/config.yaml); named here so the tiny stage
        # fits it whatever the default becomes (README, "A deformation of each sample")
        "sampling": {"scheduler": "ddim", "inference_steps": 5, "deformation": "fit"},
    },
    "image_generator": {"checkpoint_every": 10, "steps": 20, "batch_size": 2},
    "synthesis": {"enabled": True, "n_samples": 3, "conditioning": "unseen", "seed": 3,
                  "quality": {"samples_per_mode": 3}},
}
