"""The Snakemake workflow itself: DAG, config validation, bad input, partial reruns.

These run the real `snakemake` CLI of the environment on the repository's
Snakefile in a temporary working directory.
"""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_support import REPO, SNAKEMAKE, TINY, jobs_by_rule, planned_jobs, run_snakemake  # noqa: F401

def test_dry_run_lists_every_preprocessing_rule(tmp_path):
    code, out = run_snakemake(tmp_path, "-n", config=TINY)
    assert code == 0, out
    jobs = planned_jobs(out)
    for rule in ("build_template", "synthesize_subject", "validate_inputs", "preprocess_subject",
                 "preprocessed_subjects", "qc_table", "lesion_proportions", "cohort_sheet"):
        assert rule in jobs, (rule, jobs)
    assert jobs["synthesize_subject"] == 4
    assert jobs["preprocess_subject"] == 4
    assert not (tmp_path / "results").exists()


def test_config_schema_violation_is_reported(tmp_path):
    bad = dict(TINY, grid={"voxel_mm": -4.0, "shape": [48, 56, 48]})
    code, out = run_snakemake(tmp_path, "-n", config=bad)
    assert code != 0
    assert "voxel_mm" in out


def test_nonsense_demo_config_names_the_field(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["demo"]["sites"]["site_a"]["n_test"] = 5
    code, out = run_snakemake(tmp_path, "-n", config=bad)
    assert code != 0
    assert "demo.sites.site_a.n_test" in out
    assert "Traceback" not in out


def _write_subject(root, subject, shape=(20, 22, 20), nan=False, label_values=(0, 1, 2, 3),
                   label_shape=None):
    d = root / subject
    d.mkdir(parents=True, exist_ok=True)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    paths = {}
    for mod in ("t1", "t2", "flair"):
        arr = rng.random(shape).astype(np.float32)
        if nan and mod == "t2":
            arr[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(arr, aff), d / f"{mod}.nii.gz")
        paths[mod] = str(d / f"{mod}.nii.gz")
    lab = rng.choice(np.array(label_values, dtype=np.uint8), size=label_shape or shape)
    nib.save(nib.Nifti1Image(lab, aff), d / "label.nii.gz")
    paths["label"] = str(d / "label.nii.gz")
    return paths


def _sheet(tmp_path, rows):
    df = pd.DataFrame([{"subject": s, "site": "x", "split": "train", **p} for s, p in rows])
    path = tmp_path / "subjects.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize(
    "case,expect",
    [
        ("nan", ["sub-02", "t2.nii.gz", "NaN"]),
        ("labels", ["sub-02", "label.nii.gz", "42"]),
        ("geometry", ["sub-02", "label.nii.gz", "20x22x20"]),
    ],
)
def test_bad_input_stops_before_any_work(tmp_path, case, expect):
    data = tmp_path / "data"
    good = _write_subject(data, "sub-01")
    kwargs = {"nan": {"nan": True}, "labels": {"label_values": (0, 1, 42)},
              "geometry": {"label_shape": (20, 22, 21)}}[case]
    bad = _write_subject(data, "sub-02", **kwargs)
    sheet = _sheet(tmp_path, [("sub-01", good), ("sub-02", bad)])
    cfg = dict(TINY, samples=str(sheet))
    code, out = run_snakemake(tmp_path, "--forceall", config=cfg)
    assert code != 0
    for word in expect:
        assert word in out, (word, out[-3000:])
    pre = tmp_path / "results" / "tiny" / "preprocessing"
    assert not (pre / "input_check.tsv").exists()
    assert not (pre / "subjects").exists(), "work started despite invalid input"


def test_missing_file_and_duplicate_subject_reported_at_start(tmp_path):
    data = tmp_path / "data"
    good = _write_subject(data, "sub-01")
    missing = dict(good, flair=str(data / "sub-01" / "nope.nii.gz"))
    sheet = _sheet(tmp_path, [("sub-01", good), ("sub-02", missing)])
    code, out = run_snakemake(tmp_path, "-n", config=dict(TINY, samples=str(sheet)))
    assert code != 0
    assert "sub-02" in out and "nope.nii.gz" in out and "does not exist" in out
    assert "Traceback" not in out

    sheet = _sheet(tmp_path, [("sub-01", good), ("sub-01", good)])
    code, out = run_snakemake(tmp_path, "-n", config=dict(TINY, samples=str(sheet)))
    assert code != 0
    assert "sub-01" in out and "duplicate" in out.lower()


def test_non_nifti_and_2d_inputs_are_named(tmp_path):
    data = tmp_path / "data"
    good = _write_subject(data, "sub-01")
    bad = _write_subject(data, "sub-02")
    Path(bad["t2"]).write_text("this is not an image")
    flat = data / "sub-03"
    shutil.copytree(data / "sub-01", flat)
    nib.save(nib.Nifti1Image(np.zeros((20, 22), np.float32), np.eye(4)), flat / "flair.nii.gz")
    rows = [("sub-01", good), ("sub-02", bad),
            ("sub-03", {k: str(flat / Path(v).name) for k, v in good.items()})]
    sheet = _sheet(tmp_path, rows)
    code, out = run_snakemake(tmp_path, "--forceall", config=dict(TINY, samples=str(sheet)))
    assert code != 0
    assert "sub-02" in out and "not a NIfTI" in out
    assert "sub-03" in out and "flair" in out
    assert not (tmp_path / "results" / "tiny" / "preprocessing" / "subjects").exists()


@pytest.mark.slow
def test_tiny_demo_runs_and_param_change_reruns_only_downstream(tmp_path):
    run_snakemake(tmp_path, config=TINY, check=True)
    res = tmp_path / "results" / "tiny"
    qc = pd.read_csv(res / "preprocessing" / "qc.tsv", sep="\t")
    assert len(qc) == 4
    assert (qc["skull_strip_dice"] >= 0.90).all(), qc
    lp = pd.read_csv(res / "preprocessing" / "lesion_proportions.tsv", sep="\t")
    assert lp["n_tumour"].max() > 0
    for lt in ("tumour", "wmh"):  # dc_jl = count / cohort max: the max subject gets 1
        expected = 1.0 if lp[f"n_{lt}"].max() > 0 else 0.0
        assert lp[f"dc_{lt}"].max() == pytest.approx(expected)
        assert lp[f"dc_{lt}"].between(0, 1).all()
    for s in qc["subject"]:
        folder = res / "preprocessing" / "subjects" / s
        prob = nib.load(folder / "grid" / "tissue_prob.nii.gz").get_fdata()
        np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-4)
        assert (folder / "qc.png").stat().st_size > 1000
    assert not list((res / "preprocessing" / "subjects").glob(".*")), "temporary folders left behind"
    # per split: the preprocessed subjects and their working-grid files
    splits = {p.stem: pd.read_csv(p, sep="\t") for p in (res / "preprocessing" / "splits").glob("*.tsv")}
    assert sorted(s for t in splits.values() for s in t["subject"]) == sorted(qc["subject"])
    for name, table in splits.items():
        assert (table["split"] == name).all()
        assert all((tmp_path / p).is_file() for p in table[["t1", "t2", "flair", "label", "tissue_prob"]].values.ravel())

    code, out = run_snakemake(tmp_path, "-n", config=TINY)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # a preprocessing setting reruns every subject's preprocessing job (one job per subject)
    # and the tables built from them
    changed = yaml.safe_load(yaml.safe_dump(TINY))
    changed["preprocessing"] = {"skull_strip": {"threshold": 0.4, "closing_voxels": 1, "min_dice": 0.9}}
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out
    jobs = planned_jobs(out)
    assert set(jobs) == {"preprocess_subject", "preprocessed_subjects", "qc_table", "lesion_proportions",
                         "all"}, jobs
    assert jobs["preprocess_subject"] == 4

    # the QC thresholds only flag subjects in the QC table: nothing else reruns
    changed["preprocessing"] = {"skull_strip": {"threshold": 0.7, "closing_voxels": 1, "min_dice": 0.95},
                                "coregistration": {"min_mask_dice": 0.5}}
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out
    assert set(planned_jobs(out)) == {"qc_table", "all"}, out[-2000:]

    # listing a site as delivered skull-stripped reruns that site's subjects only
    changed["preprocessing"] = {"skull_stripped": ["site_b"]}
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out
    sheet = pd.read_csv(res / "cohort" / "subjects.tsv", sep="\t")
    site_b = sheet.loc[sheet["site"] == "site_b", "subject"].tolist()
    assert jobs_by_rule(out)["preprocess_subject"] == [f"subject={s}" for s in site_b], out[-2000:]


def test_ingest_rule_writes_a_sheet_from_brats_layout(tmp_path):
    root = tmp_path / "BraTS2021"
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    for case in ("BraTS2021_00001", "BraTS2021_00002"):
        d = root / case
        d.mkdir(parents=True)
        for kind in ("t1", "t1ce", "t2", "flair", "seg"):
            arr = np.zeros((8, 8, 8), np.uint8 if kind == "seg" else np.float32)
            nib.save(nib.Nifti1Image(arr, aff), d / f"{case}_{kind}.nii.gz")
    code, out = run_snakemake(tmp_path, "results/ingest/brats_subjects.tsv",
                              config=dict(TINY, ingest_root=str(root)))
    assert code == 0, out[-3000:]
    sheet = pd.read_csv(tmp_path / "results" / "ingest" / "brats_subjects.tsv", sep="\t")
    assert list(sheet["subject"]) == ["BraTS2021_00001", "BraTS2021_00002"]
    assert sheet["label"].str.endswith("BraTS2021_00001_seg.nii.gz").iloc[0]
    assert Path(sheet["t1ce"].iloc[1]).exists()
