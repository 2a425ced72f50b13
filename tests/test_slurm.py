"""The SLURM profile on a real single-node SLURM cluster on localhost.

A module fixture starts munged, MariaDB, slurmdbd, slurmctld and slurmd from Debian's
packages (tests/hpc/slurm_cluster.py; installs them with apt-get when missing) and stops
every one of them afterwards. The tiny preprocessing DAG then runs through
`snakemake --profile <profile derived from profiles/slurm>`: the adaptations a user makes
for a cluster (partition and account names, no GPU request on a cluster without GPUs)
plus test-only settings (fast status polling, keep SLURM logs, no retries). sacct must list
every non-local job of the DAG under the run's SLURM job name, with the rule in its comment,
and the outputs must equal a local run of the same config for one subject.

Run alone: `pytest -m slurm` (root; about 2 min on 2 cores, more when the packages are installed).
"""

import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_support import REPO, TINY, local_rules, planned_jobs, run_snakemake

sys.path.insert(0, str(Path(__file__).parent / "hpc"))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# the subject compared with a local run: site_c (far OOD, coarsest voxels, most noise)
SUBJECT = "demo004"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        times = c.start()
    except slurm_cluster.EnvironmentUnavailable as e:
        c.stop()
        pytest.skip(f"this machine cannot host a SLURM cluster: {e}")
    except BaseException:
        c.stop()
        raise
    try:
        yield c, times
    finally:
        c.stop()
        assert not c.running(), c.status()
        shutil.rmtree(c.state / "mysql", ignore_errors=True)  # ~160 MB of database files


def derived_profile(dest, info):
    """profiles/slurm with this cluster's partition and account, no GPU requests, and
    capped to the node (the user-facing adaptations); plus test-only settings."""
    cfg = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    cfg["default-resources"]["slurm_partition"] = info["partition"]
    cfg["default-resources"]["slurm_account"] = info["account"]
    for res in cfg.get("set-resources", {}).values():
        if "slurm_partition" in res:
            res["slurm_partition"] = info["partition"]
        for key in ("gpu", "gpu_model", "gres"):
            res.pop(key, None)
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(res["cpus_per_task"], info["cpus"])
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], info["real_memory_mb"])
    for rule, n in (cfg.get("set-threads") or {}).items():
        cfg["set-threads"][rule] = min(n, info["cpus"])
    cfg.update({
        "retries": 0,  # a failure must show, not be retried away
        "keep-going": False,
        "slurm-init-seconds-before-status-checks": 2,  # default 40 s: minutes on a 33-job DAG
        "slurm-keep-successful-logs": True,
        "slurm-logdir": str(dest.parent / "slurm_logs"),
    })
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _sacct(c, run_id):
    out = c.client("sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1day", "-E", "now",
                   "-o", "JobIDRaw,JobName,Comment,State,Account,Partition,AllocCPUS,ReqMem,ElapsedRaw").stdout
    cols = ["jobid", "name", "comment", "state", "account", "partition", "cpus", "reqmem", "elapsed_s"]
    return pd.DataFrame([line.split("|") for line in out.splitlines() if line], columns=cols)


def _images(root, subject):
    return sorted([*(root / "results" / "tiny" / "cohort" / subject).glob("*.nii.gz"),
                   *(root / "results" / "tiny" / "preprocessing" / "subjects" / subject).rglob("*.nii.gz")])


def _timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    return time.monotonic() - t0, result


def test_tiny_dag_through_slurm_matches_local_run(cluster, tmp_path, monkeypatch):
    c, start_times = cluster
    info = c.info()
    monkeypatch.setenv("SLURM_CONF", str(c.conf))
    for k in [k for k in os.environ if k.startswith(("SLURM_JOB", "SBATCH_", "SRUN_"))]:
        monkeypatch.delenv(k)
    profile = derived_profile(tmp_path / "profile", info)
    work = tmp_path / "slurm_run"
    work.mkdir()

    code, out = run_snakemake(work, "-n", "--profile", str(profile), config=TINY)
    assert code == 0, out[-4000:]
    planned = planned_jobs(out)
    remote = {r: n for r, n in planned.items() if r not in local_rules()}

    # The local run of one subject's chain (template, cohort, input check, then N4,
    # registration, skull strip, working grid in the subject's job) runs alongside: it fills the CPU while the executor waits
    # between its sacct polls.
    local = tmp_path / "local_run"
    local.mkdir()
    pre = "results/tiny/preprocessing"
    pool = ThreadPoolExecutor(1)
    local_job = pool.submit(_timed, run_snakemake, local, "results/tiny/cohort/subjects.tsv",
                            f"{pre}/subjects/{SUBJECT}", config=TINY, timeout=1200)
    try:
        slurm_seconds, (code, out) = _timed(run_snakemake, work, "--profile", str(profile), config=TINY,
                                            timeout=1200)
        assert code == 0, out[-6000:]
    finally:
        local_seconds, (local_code, local_out) = local_job.result()
        pool.shutdown()
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)

    # every non-local job went through sbatch: sacct knows it under the run's job name,
    # its comment names the rule, it ran on the local partition under the account
    jobs = _sacct(c, run_id)
    assert len(jobs) == sum(remote.values()), (remote, jobs.to_string())
    jobs["rule"] = jobs["comment"].str.extract(r"^rule_(\w+?)(?:_wildcards_.*)?$", expand=False)
    assert jobs["rule"].value_counts().to_dict() == remote, jobs.to_string()
    assert (jobs["state"] == "COMPLETED").all(), jobs.to_string()
    assert set(jobs["account"]) == {info["account"]} and set(jobs["partition"]) == {info["partition"]}
    assert jobs.loc[jobs["rule"] == "preprocess_subject", "cpus"].astype(int).eq(1).all()
    # one SLURM log per job, written by the job on the node
    logs = list((tmp_path / "slurm_logs").rglob("*.log"))
    assert len(logs) == len(jobs), logs
    assert out.count("has been submitted with SLURM jobid") == len(jobs)

    # the whole tiny cohort came out as in the local end-to-end test
    res = work / "results" / "tiny"
    qc = pd.read_csv(res / "preprocessing" / "qc.tsv", sep="\t")
    assert len(qc) == 4 and (qc["skull_strip_dice"] >= 0.90).all(), qc

    # the local run of the same config: the same files, the same numbers
    assert local_code == 0, local_out[-4000:]
    for rel in ("results/tiny/cohort/subjects.tsv", f"{pre}/input_check.tsv",
                f"{pre}/subjects/{SUBJECT}/grid/lesions.json"):  # the sheet holds absolute paths
        assert (work / rel).read_text().replace(str(work), "ROOT") == \
            (local / rel).read_text().replace(str(local), "ROOT"), rel
    q_local = json.loads((local / pre / "subjects" / SUBJECT / "skull_strip" / "qc.json").read_text())
    q_slurm = json.loads((work / pre / "subjects" / SUBJECT / "skull_strip" / "qc.json").read_text())
    assert q_slurm == q_local
    row = qc.set_index("subject").loc[SUBJECT]
    assert row["skull_strip_dice"] == pytest.approx(q_local["skull_strip_dice"], abs=1e-6)
    local_images = _images(local, SUBJECT)
    assert len(local_images) >= 17, local_images
    assert [p.relative_to(local) for p in local_images] == [p.relative_to(work) for p in _images(work, SUBJECT)]
    for p in local_images:
        a = nib.load(p)
        b = nib.load(work / p.relative_to(local))
        np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(p))
        x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
        assert x.shape == y.shape and x.dtype == y.dtype, p
        # single-threaded seeded registration: bit-identical, whichever host runs it
        np.testing.assert_array_equal(x, y, err_msg=str(p))
    mat = f"{pre}/subjects/{SUBJECT}/registration/0GenericAffine.mat"
    assert (work / mat).read_bytes() == (local / mat).read_bytes()

    print(f"\nSLURM: apt install {start_times['apt_install_s']} s, cluster start "
          f"{start_times['cluster_start_s']} s, smoke job {start_times['smoke_job_s']} s; "
          f"DAG via SLURM {slurm_seconds:.0f} s ({len(jobs)} sbatch jobs in sacct, "
          f"{jobs['elapsed_s'].astype(int).sum()} s of job time: "
          f"{jobs['rule'].value_counts().to_dict()}); local run of {SUBJECT} {local_seconds:.0f} s; "
          f"{len(local_images)} images bit-identical")
