"""benchmarks/gpu_check.sh in its CPU form: every measurement it prints at paper scale on a GPU
runs here at the demo grid (generators' training steps, DDIM / DDPM sampling, image generation
by both image generators, the diffusion one with 5 DDIM steps, nnU-Net 3d_fullres iterations with
nnU-Net's own plans)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], capture_output=True,
                          text=True, timeout=1200, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                         "OMP_NUM_THREADS": "2"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for what in ("train label_vae", "train label_ldm", "train image_generator", "train spade_diffusion",
                 "DDIM 10 steps", "DDPM", "generate images", "spade_diffusion images"):
        assert re.search(rf"48x56x48\s.*{re.escape(what)}.*\d+\.\d+ s/", out), (what, out[-3000:])
    assert re.search(r"spade_diffusion images \(3 modalities, DDIM 5\)", out), out[-3000:]  # the CPU form's steps
    m = re.search(r"RESULT nnunet_3d_fullres_eager\s+([0-9.]+) s/iteration", out)
    assert m and float(m.group(1)) > 0, out[-3000:]
    assert "gpu_check done in" in out and "FAILED" not in out
