"""Fault tolerance and determinism of the whole workflow (real snakemake, ANTs, nnU-Net).

One uninterrupted run of the tiny segmentation demo (``TINY_SEG``: preprocessing,
nnU-Net for one task and two arms, scores, tables; the session's, ``conftest.py``) is the
reference for both tests:

* a run killed with SIGKILL (the whole process group: snakemake and its jobs) twice,
  once inside a registration and once inside nnU-Net training, resumed with
  ``--rerun-incomplete``, ends with the same files as the reference. That run trains
  its models from scratch in another folder, so it is also the determinism test:
  two runs with the same seeds give bit-identical metric tables, scores and
  predictions (the files that are *not* bit-identical are listed in
  :data:`NOT_REPRODUCIBLE` with the reason);
* damaged intermediate files are detected, named, moved aside and rebuilt (a file in a
  preprocessed subject's folder: the whole folder, the unit Snakemake tracks).
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from brainsynth import integrity

from workflow_support import SNAKEMAKE, TINY_SEG, planned_jobs, run_snakemake, snakemake_command

EXP = TINY_SEG["experiment"]

# Outputs that differ between two runs by design (glob patterns under results/<exp>/).
NOT_REPRODUCIBLE = {
    "cohort/subjects.tsv": "absolute paths of the working directory",
    "segmentation/*/*/model.json": "training wall time (train_seconds)",
    # nnU-Net's own training folder: logs with timestamps and timings, progress.png of the
    # epoch times, checkpoints holding the same (pickled) log; the network weights in the
    # checkpoint are compared separately and are bit-identical
    "segmentation/*/*/nnunet/results/**": "nnU-Net training logs and timings",
}


def _glob_re(pattern):
    return re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")


def _excluded(rel):
    return any(re.fullmatch(_glob_re(p), rel) for p in NOT_REPRODUCIBLE)


def _files(root):
    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _differences(ref, other):
    """Relative paths under results/<exp> whose bytes differ (or that exist on one side only)."""
    a, b = Path(ref) / "results" / EXP, Path(other) / "results" / EXP
    fa, fb = _files(a), _files(b)
    diff = sorted(rel for rel in fa ^ fb if not _excluded(rel))
    for rel in sorted(fa & fb):
        if _excluded(rel):
            continue
        pa, pb = a / rel, b / rel
        if pa.is_symlink() or pb.is_symlink():
            if os.readlink(pa) != os.readlink(pb):
                diff.append(rel)
        elif pa.read_bytes() != pb.read_bytes():
            diff.append(rel)
    return diff


def _network_weights_equal(ref, other):
    a, b = Path(ref) / "results" / EXP, Path(other) / "results" / EXP
    ckpts = sorted(a.glob("segmentation/*/*/nnunet/results/*/*/fold_*/checkpoint_final.pth"))
    assert ckpts
    for ca in ckpts:
        wa = torch.load(ca, map_location="cpu", weights_only=False)["network_weights"]
        wb = torch.load(b / ca.relative_to(a), map_location="cpu", weights_only=False)["network_weights"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (ca, k)
    return len(ckpts)


def _hidden_leftovers(workdir):
    """Temporaries of interrupted writers: hidden files/folders under results/ (not the
    ``.snakemake_timestamp`` snakemake keeps in directory outputs)."""
    return sorted(str(p.relative_to(workdir)) for p in (Path(workdir) / "results").rglob(".*")
                  if p.name != ".snakemake_timestamp")


def _start(workdir, *args):
    cmd, env = snakemake_command(workdir, *args, config=TINY_SEG)
    out = open(Path(workdir) / f"snakemake.{time.monotonic_ns()}.out", "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env), out


def _kill_when(proc, ready, timeout=900):
    """SIGKILL snakemake's whole process group (it and its jobs) as soon as ``ready()`` is true."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "snakemake ended before the kill point"
        assert time.monotonic() < end, "kill point not reached"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _processes_in(workdir):
    """Processes whose working directory is ``workdir`` (snakemake and its jobs run there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(workdir):
                found.append(pid)
        except OSError:
            pass
    return found


def _assert_nothing_damaged(workdir):
    """Every file a killed run left under results/ is complete (atomic writes). Not checked:
    nnU-Net's training folder of an unfinished training (a directory output that snakemake
    deletes before the job reruns; nnU-Net writes its checkpoints there itself)."""
    unfinished = [d for d in (Path(workdir) / "results").glob("*/segmentation/*/*/nnunet/results")
                  if not (d.parent.parent / "model.json").exists()]
    damaged = [f for f in integrity.scan(Path(workdir) / "results", move=False)
               if not any(Path(f[0]).is_relative_to(d) for d in unfinished)]
    assert damaged == [], damaged


@pytest.fixture(scope="module")
def reference(tiny_seg_run):
    return tiny_seg_run


@pytest.mark.slow
def test_killed_run_resumes_with_rerun_incomplete_and_matches_uninterrupted_run(reference, tmp_path):
    workdir = tmp_path.resolve()
    res = workdir / "results" / EXP
    # 1) kill inside a registration (its temporary folder exists while ANTs runs, inside the
    # subject job's hidden temporary folder)
    reg_tmp = "preprocessing/subjects/.*.tmpdir/registration/.reg_tmp_*"
    proc, _ = _start(workdir)
    _kill_when(proc, lambda: any(res.glob(reg_tmp)))
    time.sleep(0.5)
    assert _processes_in(workdir) == [], "a job survived the kill of its process group"
    assert any(res.glob(reg_tmp))  # the killed job's leftover
    assert any((workdir / ".snakemake" / "incomplete").iterdir())
    _assert_nothing_damaged(workdir)

    # without --rerun-incomplete: a killed job that had not written its output (atomic
    # writes: the subject folder appears only when the whole chain is done) is simply
    # planned again; one killed after writing it is caught by its incomplete marker and
    # snakemake stops
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    if code == 0:
        assert planned_jobs(out).get("preprocess_subject", 0) >= 1, out[-3000:]
    else:
        assert "IncompleteFilesException" in out and "--rerun-incomplete" in out, out[-3000:]

    # a killed snakemake leaves its lock: the working directory has to be unlocked first
    code, out = run_snakemake(workdir, "--unlock", config=TINY_SEG)
    assert code == 0, out[-2000:]

    # 2) resume, then kill inside nnU-Net training (its first epoch started: nnU-Net's own
    # training log, written line by line in the model folder, says so)
    proc, _ = _start(workdir, "--rerun-incomplete")
    _kill_when(proc, lambda: any("Epoch 0" in p.read_text(errors="replace") for p in
                                 res.glob("segmentation/*/*/nnunet/results/*/*/fold_*/training_log_*.txt")))
    time.sleep(0.5)
    assert _processes_in(workdir) == []
    # an arm with nnU-Net's half-done training folder but no model.json
    assert any(not (d.parent.parent / "model.json").exists() for d in res.glob("segmentation/*/*/nnunet/results"))
    _assert_nothing_damaged(workdir)

    # 3) resume to the end
    code, out = run_snakemake(workdir, "--rerun-incomplete", config=TINY_SEG)
    assert code != 0 and "LockException" in out, out[-2000:]
    code, out = run_snakemake(workdir, "--unlock", config=TINY_SEG)
    assert code == 0, out[-2000:]
    code, out = run_snakemake(workdir, "--rerun-incomplete", config=TINY_SEG)
    assert code == 0, out[-4000:]
    assert _hidden_leftovers(workdir) == []
    assert not any((workdir / ".snakemake" / "incomplete").iterdir())
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # same files as the uninterrupted reference run, bit for bit (training restarted from
    # scratch in this folder: this is also the same-seed determinism test)
    assert _differences(reference, workdir) == []
    assert _network_weights_equal(reference, workdir) == 2
    # ... and the compared results are not trivially equal: the tiny models predict
    # thousands of voxels (their WMH Dice is 0 at this training length, FP_tum is not)
    scores = pd.read_csv(res / "segmentation" / "wmh" / "R" / "scores.tsv", sep="\t")
    assert (scores.loc[scores["metric"] == "pred_voxels", "value"] > 1000).all(), scores
    fp_tum = pd.read_csv(res / "tables" / "wmh_fp_tum.csv")
    assert fp_tum.equals(pd.read_csv(reference / "results" / EXP / "tables" / "wmh_fp_tum.csv"))
    assert (scores.loc[scores["metric"] == "fp_tum", "value"] > 0).any(), scores


@pytest.mark.slow
def test_damaged_intermediate_is_named_moved_aside_and_rebuilt(reference, tmp_path):
    # the reference run's files are all intact (no false alarm)
    assert integrity.scan(reference / "results", move=False) == []
    workdir = tmp_path / "wd"
    shutil.copytree(reference, workdir, symlinks=True)  # keeps mtimes and snakemake's metadata
    res = workdir / "results" / EXP
    subject = sorted(p.name for p in res.glob("segmentation/wmh/R/predictions/near_ood/*.nii.gz"))[0][:-7]
    folder = res / "preprocessing" / "subjects" / subject
    grid = folder / "grid"
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # Snakemake tracks a preprocessed subject as one folder (its .snakemake_timestamp):
    # neither a newer modification time nor damage inside it reruns anything
    label = grid / "label.nii.gz"
    os.utime(label)
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # damage that snakemake cannot notice: `python -m brainsynth.integrity` finds it and
    # moves the whole subject folder aside (the unit snakemake rebuilds)
    warped = folder / "registration" / "1Warp.nii.gz"
    _garble(warped)
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]
    proc = subprocess.run([str(Path(SNAKEMAKE).parent / "python"), "-m", "brainsynth.integrity", str(res)],
                          capture_output=True, text=True, cwd=workdir)
    assert proc.returncode == 1 and "1Warp.nii.gz" in proc.stdout, proc.stdout + proc.stderr
    aside = folder.parent / f"{subject}.corrupt"
    assert not folder.exists() and (aside / "registration" / "1Warp.nii.gz").is_file()

    # the next run rebuilds that test subject and what depends on it; no model is retrained
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["preprocess_subject"] == 1 and "train_segmentation" not in jobs, jobs
    code, out = run_snakemake(workdir, config=TINY_SEG)
    assert code == 0, out[-4000:]
    assert warped.is_file() and integrity.scan(res, move=False) == []
    # only the evidence (the folder moved aside) differs from the uninterrupted run
    assert [d for d in _differences(reference, workdir) if ".corrupt/" not in d] == []

    # damage found when a job reads the file (a rerun of the predictions): the job names it,
    # moves the subject folder aside and fails without a traceback; the next run rebuilds it
    flair = grid / "flair.nii.gz"
    data = flair.read_bytes()
    flair.write_bytes(data[: len(data) // 2])
    code, out = run_snakemake(workdir, "--forcerun", "predict_segmentation", config=TINY_SEG)
    assert code != 0
    rel = f"results/{EXP}/preprocessing/subjects/{subject}/grid/flair.nii.gz"
    assert f"file '{rel}': damaged intermediate file: damaged gzip stream" in out, out[-4000:]
    assert f"moved aside to {aside.resolve()}" in out and "run snakemake again" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert not folder.exists() and (aside / "grid" / "flair.nii.gz").read_bytes() == data[: len(data) // 2]
    code, out = run_snakemake(workdir, "-n", config=TINY_SEG)
    assert code == 0 and planned_jobs(out)["preprocess_subject"] == 1, out[-3000:]
    code, out = run_snakemake(workdir, config=TINY_SEG)
    assert code == 0, out[-4000:]
    assert flair.is_file() and integrity.scan(res, move=False) == []
    assert (aside / "grid" / "flair.nii.gz").is_file()  # the evidence stays
    diff = [d for d in _differences(reference, workdir) if ".corrupt/" not in d]
    assert diff == [], diff


def _garble(path):
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i:i + 256] = bytes(b ^ 0xFF for b in data[i:i + 256])
    path.write_bytes(bytes(data))
