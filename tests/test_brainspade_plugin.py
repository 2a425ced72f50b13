"""brainSPADE moved behind the plugin layout (generators/brainspade/) writes the same files, bit
for bit, as the code before the move (commit e85a44d, materialised from git history) at the
same seed: trained models, loss tables and figures, samples, manifest, montage. The resumable
checkpoints differ only in their input fingerprint (paths and mtimes of the inputs), so they
are compared without it. Settings added since the move are stored with the models (their
config); at their defaults they change nothing, so model files and config records are compared
without them, everything else (weights included) exactly; the manifest without the columns
added since. Both trees train in the default memory
layout (the channels-last layout of float32 CPU training came later and rounds differently)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BEFORE_MOVE = "e85a44d"
# settings added since the move, with the default that leaves outputs as they were
ADDED_SINCE_MOVE = {"posterior_sigma_init": None, "compose_lesion_types": False, "negate_unrequested": False,
                    "compose_weight": 1.0,
                    "lr_schedule": "constant", "select_every": 0, "calibration": "none", "norm": "instance",
                    "output_block_channels": 0, "training_amp": False, "lesion_presence": False,
                    "reconstruction_target": "soft", "unrequested_lesions": "keep", "tissue_offsets": "none",
                    "deformation": "none", "patch_size": 1}
# manifest columns added since the move (the outputs' other columns and files compared as they are)
MANIFEST_ADDED_SINCE_MOVE = ["unrequested_lesion_voxels"]


def _without_added(obj):
    if isinstance(obj, dict):
        return {k: _without_added(v) for k, v in obj.items()
                if not (k in ADDED_SINCE_MOVE and v == ADDED_SINCE_MOVE[k])}
    if isinstance(obj, list):
        return [_without_added(v) for v in obj]
    return obj


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy arrays (RNG states)
        return a.shape == b.shape and a.dtype == b.dtype and (a == b).all()
    return a == b


def _outputs(tree, out):
    env = dict(os.environ, PYTHONPATH=str(tree / "workflow"), TESTS_DIR=str(tree / "tests"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "brainspade_outputs.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1)[::-1] for line in proc.stdout.splitlines())


@pytest.mark.slow
def test_brainspade_outputs_unchanged_by_the_move(tmp_path):
    git = shutil.which("git")
    has = git and subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{BEFORE_MOVE}^{{commit}}"],
                                 capture_output=True).returncode == 0
    if not has:
        pytest.skip(f"commit {BEFORE_MOVE} is not in this clone's history (shallow clone)")
    old = tmp_path / "before"
    old.mkdir()
    archive = subprocess.run([git, "-C", str(REPO), "archive", BEFORE_MOVE, "workflow", "tests"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    assert (old / "workflow" / "brainsynth" / "generators" / "label_generator.py").is_file()
    before = _outputs(old, tmp_path / "out_before")
    after = _outputs(REPO, tmp_path / "out_after")
    assert sorted(before) == sorted(after) and len(after) >= 25
    checkpoints = [f for f in after if "/checkpoints/" in f]
    assert len(checkpoints) == 3
    for f in after:
        if f in checkpoints:
            a = torch.load(tmp_path / "out_before" / f, map_location="cpu", weights_only=False)
            b = torch.load(tmp_path / "out_after" / f, map_location="cpu", weights_only=False)
            assert a.keys() == b.keys()
            for key in a:
                if key != "fingerprint":
                    assert _same(a[key], b[key]), (f, key)
        elif before[f] != after[f] and f.endswith(".pt"):   # a model file: its stored config
            a = torch.load(tmp_path / "out_before" / f, map_location="cpu", weights_only=False)
            b = torch.load(tmp_path / "out_after" / f, map_location="cpu", weights_only=False)
            assert _same(a, _without_added(b)), f
        elif before[f] != after[f] and f.endswith("manifest.tsv"):
            a, b = (pd.read_csv(tmp_path / d / f, sep="\t") for d in ("out_before", "out_after"))
            pd.testing.assert_frame_equal(a, b.drop(columns=MANIFEST_ADDED_SINCE_MOVE))
        elif before[f] != after[f] and f.endswith("_config.json"):
            a, b = (json.loads((tmp_path / d / f).read_text()) for d in ("out_before", "out_after"))
            assert a == _without_added(b), f
        else:
            assert before[f] == after[f], f
