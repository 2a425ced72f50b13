"""Atomic writes (permissions, leftovers) and the integrity checks of intermediate files."""

import gzip
import json
import os
import stat
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.io

from brainsynth import integrity
from brainsynth.errors import InputError, InputErrors
from brainsynth.io import atomic_path, current_umask, save_json, save_nifti, save_table

from workflow_support import REPO


# ----------------------------------------------------------------------------- atomic_path
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_path_gives_umask_permissions(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    out = save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "a" / "img.nii.gz")
    assert stat.S_IMODE(out.stat().st_mode) == mode
    # the same mode a plain open() gives
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
    save_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
    assert stat.S_IMODE((tmp_path / "t.tsv").stat().st_mode) == mode


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leftover_is_removed_by_the_next_write(tmp_path):
    # what a SIGKILL between mkstemp and os.replace leaves behind
    fd, stale = tempfile.mkstemp(prefix=".img.nii.gz.", suffix=".nii.gz", dir=tmp_path)
    os.close(fd)
    unrelated = tmp_path / ".img.nii.gz.notours"
    unrelated.write_text("keep")
    save_nifti(np.ones((2, 2, 2), np.uint8), np.eye(4), tmp_path / "img.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".img.nii.gz.notours", "img.nii.gz"]


# ----------------------------------------------------------------------------- integrity checks
def _good_files(d):
    files = {
        "nii": save_nifti(np.arange(24 * 20 * 16, dtype=np.float32).reshape(24, 20, 16), np.eye(4),
                          d / "img.nii.gz"),
        "json": save_json({"subject": "s1", "n": [1, 2, 3]}, d / "rec.json"),
        "tsv": save_table(pd.DataFrame({"subject": ["a", "b"], "dice": [0.9, 0.8]}), d / "t.tsv"),
    }
    pd.DataFrame({"arm": ["R", "S"], "dice": [0.5, 0.6]}).to_csv(d / "t.csv", index=False)
    files["csv"] = d / "t.csv"
    scipy.io.savemat(d / "0GenericAffine.mat", {"AffineTransform_float_3_3": np.ones((12, 1), np.float32),
                                                "fixed": np.zeros((3, 1), np.float32)}, format="4")
    files["mat"] = d / "0GenericAffine.mat"
    with zipfile.ZipFile(d / "model.pt", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", os.urandom(4000))
    files["pt"] = d / "model.pt"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(d / "fig.png")
    plt.close(fig)
    files["png"] = d / "fig.png"
    return files


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep if keep > 0 else len(data) + keep])


def test_intact_files_pass(tmp_path):
    for kind, path in _good_files(tmp_path).items():
        assert integrity.check_file(path) is None, kind


@pytest.mark.parametrize("kind,damage,expect", [
    ("nii", lambda p: _truncate(p, 2000), "gzip"),
    ("nii", lambda p: _truncate(p, -4), "gzip"),  # only the length trailer lost: the voxels still decompress
    ("nii", lambda p: _garble(p, 0.5), ""),
    ("nii", lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:2000])),  # valid gzip, short
     "data block too short"),
    ("json", lambda p: _truncate(p, 20), "JSON"),
    ("tsv", lambda p: _truncate(p, -3), "newline"),
    ("tsv", lambda p: p.write_text("subject\tdice\na\t0.9\nb\n"), "fields"),
    ("csv", lambda p: _truncate(p, -2), "newline"),
    ("mat", lambda p: _truncate(p, 40), "transform"),
    ("pt", lambda p: _truncate(p, -30), "zip"),
    ("pt", lambda p: _garble(p, 0.3), "zip"),
    ("png", lambda p: _truncate(p, -20), "IEND"),
    ("json", lambda p: p.write_bytes(b""), "empty"),
])
def test_damaged_files_are_detected(tmp_path, kind, damage, expect):
    path = _good_files(tmp_path)[kind]
    damage(path)
    problem = integrity.check_file(path)
    assert problem is not None and expect in problem, problem


def _garble(path, where):
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i:i + 64] = bytes((b ^ 0x5A) for b in data[i:i + 64])
    path.write_bytes(bytes(data))


def test_verify_inputs_moves_damaged_intermediates_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "results" / "exp" / "n4" / "s1"
    res.mkdir(parents=True)
    good = _good_files(res)
    outside = tmp_path / "data"
    outside.mkdir()
    user = save_json({"x": 1}, outside / "user.json")
    _truncate(user, 3)  # the user's own (damaged) file: never moved, validate_inputs reports such files
    _truncate(good["nii"], 3000)
    rel = os.path.relpath(good["nii"])
    checked = integrity.verify_inputs([good["json"], str(user), str(outside / "gone.nii.gz")])
    assert checked == [str(good["json"])]
    with pytest.raises(InputError, match="missing: removed while"):  # snakemake saw it when starting the job
        integrity.verify_inputs(["results/exp/missing.nii.gz"])
    with pytest.raises(InputError) as err:
        integrity.verify_inputs([rel, good["tsv"], str(user)])
    msg = str(err.value)
    assert rel in msg and "damaged" in msg and f"{rel}.corrupt" in msg and "run snakemake again" in msg
    assert not good["nii"].exists() and (res / "img.nii.gz.corrupt").is_file()
    assert user.is_file()
    with pytest.raises(InputError, match="moved aside to .*img.nii.gz.corrupt"):  # a parallel job's view
        integrity.verify_inputs([rel])

    _truncate(good["json"], 5)
    _truncate(good["tsv"], -1)
    with pytest.raises(InputErrors) as err:
        integrity.verify_inputs([good["json"], good["tsv"]])
    assert len(err.value.errors) == 2


def test_integrity_command_line_scans_a_folder(tmp_path):
    res = tmp_path / "results" / "exp"
    res.mkdir(parents=True)
    files = _good_files(res)
    _garble(files["nii"], 0.6)
    cmd = [sys.executable, "-m", "brainsynth.integrity", str(res)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"))
    proc = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "img.nii.gz" in proc.stdout and files["nii"].exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "moved to" in proc.stdout, proc.stdout + proc.stderr
    assert not files["nii"].exists() and (res / "img.nii.gz.corrupt").exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "no damaged files" in proc.stdout
    assert json.loads(files["json"].read_text())["subject"] == "s1"


# ----------------------------------------------------------------------------- folder outputs
def test_atomic_dir_appears_whole_or_not_at_all(tmp_path, umask):
    from brainsynth.io import atomic_dir

    umask(0o022)
    target = tmp_path / "subjects" / "s1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert list((tmp_path / "subjects").iterdir()) == []
    # a SIGKILLed writer's leftover is removed by the next writer of the same folder
    stale = tempfile.mkdtemp(prefix=".s1.", suffix=".tmpdir", dir=tmp_path / "subjects")
    with atomic_dir(target) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "f.txt").write_text("done")
    assert sorted(p.name for p in (tmp_path / "subjects").iterdir()) == ["s1"] and not os.path.exists(stale)
    assert (target / "a" / "f.txt").read_text() == "done"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's private 0o700
    with atomic_dir(target) as tmp:  # rewriting replaces the whole folder
        (tmp / "g.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["g.txt"]


def test_damaged_file_in_a_folder_output_moves_the_folder_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results" / "exp" / "preprocessing" / "subjects" / "s1"
    (folder / "grid").mkdir(parents=True)
    files = _good_files(folder / "grid")
    (folder / integrity.SNAKEMAKE_TIMESTAMP).touch()  # what snakemake leaves in a directory output
    _truncate(files["nii"], 3000)
    rel = os.path.relpath(files["nii"])
    with pytest.raises(InputError) as err:
        integrity.verify_inputs([rel, str(files["json"])])
    assert rel in str(err.value) and f"{folder}.corrupt" in str(err.value)
    assert not folder.exists() and (tmp_path / "results" / "exp" / "preprocessing" / "subjects" / "s1.corrupt"
                                     / "grid" / "img.nii.gz").is_file()
    # a file gone from such a folder is reported and the folder moved aside too (snakemake
    # tracks the folder as a whole and would never notice)
    folder.mkdir()
    (folder / integrity.SNAKEMAKE_TIMESTAMP).touch()
    with pytest.raises(InputError, match="missing from its folder"):
        integrity.verify_inputs([str(folder / "grid" / "t1.nii.gz")])
    assert not folder.exists()
    # the command line does the same, once per folder
    (folder / "grid").mkdir(parents=True)
    files = _good_files(folder / "grid")
    (folder / integrity.SNAKEMAKE_TIMESTAMP).touch()
    _garble(files["nii"], 0.6)
    _truncate(files["json"], 4)
    found = integrity.scan(tmp_path / "results")
    assert len(found) == 1 and found[0][2] == f"{folder}.corrupt", found
    assert not folder.exists() and integrity.scan(tmp_path / "results") == []
