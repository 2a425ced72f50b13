"""Fixtures shared across test modules."""

import pytest

from workflow_support import TINY_SEG, run_snakemake


@pytest.fixture(scope="session")
def tiny_seg_run(tmp_path_factory):
    """One uninterrupted run of the tiny segmentation demo (``TINY_SEG``), made once per session:
    the fault tests compare against it and the segmentation test works on a copy of it, so the
    suite trains its nnU-Net arms once instead of twice. Never modify it; copy it
    (``shutil.copytree(..., symlinks=True)`` keeps mtimes and Snakemake's metadata)."""
    workdir = tmp_path_factory.mktemp("reference")
    run_snakemake(workdir, config=TINY_SEG, check=True, timeout=1500)
    return workdir
