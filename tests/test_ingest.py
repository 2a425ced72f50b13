"""BraTS and BIDS layouts -> sample sheet rows; CLI writes a loadable sheet."""

import nibabel as nib
import numpy as np
import pytest

from brainsynth.errors import InputError
from brainsynth.ingest import BRATS_LABEL_MAP, ingest_bids, ingest_brats, main
from brainsynth.labels import LabelSchema
from brainsynth.sheet import SHEET_COLUMNS, load_sheet
from brainsynth.validate import validate_cohort


def touch(path, nifti=False, arr=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if nifti:
        data = arr if arr is not None else np.ones((6, 6, 6), np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    else:
        path.write_bytes(b"")
    return path


def brats_tree(root, cases=("BraTS2021_00000", "BraTS2021_00002"), nifti=False, seg=True):
    for c in cases:
        for s in ("t1", "t1ce", "t2", "flair"):
            touch(root / c / f"{c}_{s}.nii.gz", nifti)
        if seg:
            lab = np.resize(np.array([0, 1, 2, 4], np.uint8), (6, 6, 6))
            touch(root / c / f"{c}_seg.nii.gz", nifti, lab)
    return root


def test_brats_rows(tmp_path):
    root = brats_tree(tmp_path / "brats")
    (root / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").unlink()
    touch(root / "README.txt")
    (root / "empty_dir").mkdir()
    df = ingest_brats(root, site="brats21", split="test")
    assert list(df.columns) == SHEET_COLUMNS
    assert list(df["subject"]) == ["BraTS2021_00000", "BraTS2021_00002"]
    r = df.iloc[0]
    assert r["site"] == "brats21" and r["split"] == "test"
    for col, suf in [("t1", "t1"), ("t1ce", "t1ce"), ("t2", "t2"), ("flair", "flair"), ("label", "seg")]:
        assert r[col] == str(root / "BraTS2021_00000" / f"BraTS2021_00000_{suf}.nii.gz")
    assert df.iloc[1]["label"] is None and r["brain_mask"] is None
    assert BRATS_LABEL_MAP == {1: "necrotic", 2: "oedema", 4: "enhancing"}


def test_brats_no_subjects(tmp_path):
    touch(tmp_path / "data" / "somefile.nii.gz")
    with pytest.raises(InputError) as exc:
        ingest_brats(tmp_path / "data")
    msg = str(exc.value)
    assert "no BraTS subjects found" in msg and "<ID>/<ID>_t1.nii.gz" in msg and "data" in msg
    with pytest.raises(InputError, match="does not exist"):
        ingest_brats(tmp_path / "nope")
    with pytest.raises(InputError, match="split 'training'"):
        ingest_brats(tmp_path / "data", split="training")


def test_bids_rows(tmp_path):
    root = tmp_path / "ds001"
    touch(root / "dataset_description.json")
    a = root / "sub-01" / "anat"
    for s in ("T1w", "T2w", "FLAIR"):
        touch(a / f"sub-01_{s}.nii.gz")
    touch(a / "sub-01_ce-gadolinium_T1w.nii.gz")
    touch(a / "sub-01_T1w.json")
    for ses in ("ses-01", "ses-02"):
        touch(root / "sub-02" / ses / "anat" / f"sub-02_{ses}_run-1_T1w.nii.gz")
    touch(root / "sub-02" / "ses-02" / "anat" / "sub-02_ses-02_run-2_T1w.nii.gz")
    touch(root / "sub-03" / "anat" / "sub-03_T2w.nii.gz")  # no T1w: skipped
    touch(root / "sub-04" / "func" / "sub-04_task-rest_bold.nii.gz")  # no anat: skipped
    d = root / "derivatives" / "seg"
    touch(d / "sub-01" / "anat" / "sub-01_space-MNI152_dseg.nii.gz")
    touch(d / "sub-01" / "anat" / "sub-01_dseg.nii.gz")
    touch(d / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    touch(d / "sub-02" / "ses-02" / "anat" / "sub-02_ses-02_desc-tissue_dseg.nii.gz")

    df = ingest_bids(root, split="val")
    assert list(df.columns) == SHEET_COLUMNS
    assert list(df["subject"]) == ["sub-01", "sub-02_ses-01", "sub-02_ses-02"]
    assert set(df["site"]) == {"ds001"} and set(df["split"]) == {"val"}
    r = df.set_index("subject")
    assert r.loc["sub-01", "t1"] == str(a / "sub-01_T1w.nii.gz")
    assert r.loc["sub-01", "t1ce"] == str(a / "sub-01_ce-gadolinium_T1w.nii.gz")
    assert r.loc["sub-01", "t2"] == str(a / "sub-01_T2w.nii.gz")
    assert r.loc["sub-01", "flair"] == str(a / "sub-01_FLAIR.nii.gz")
    assert r.loc["sub-01", "label"] == str(d / "sub-01" / "anat" / "sub-01_dseg.nii.gz")
    assert r.loc["sub-01", "brain_mask"] == str(d / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    assert r.loc["sub-02_ses-01", "t2"] is None and r.loc["sub-02_ses-01", "label"] is None
    assert r.loc["sub-02_ses-02", "t1"].endswith("sub-02_ses-02_run-1_T1w.nii.gz")
    assert r.loc["sub-02_ses-02", "label"].endswith("sub-02_ses-02_desc-tissue_dseg.nii.gz")


def test_bids_site_from_participants_and_override(tmp_path):
    root = tmp_path / "bids"
    touch(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(root / "sub-02" / "anat" / "sub-02_T1w.nii")
    (root / "participants.tsv").write_text("participant_id\tage\tsite\nsub-01\t30\tLondon KCL\nsub-02\t40\tn/a\n")
    df = ingest_bids(root)
    assert list(df["site"]) == ["London_KCL", "bids"]
    assert list(ingest_bids(root, site="s1")["site"]) == ["s1", "s1"]


def test_bids_no_subjects(tmp_path):
    touch(tmp_path / "notbids" / "sub-01" / "T1.nii.gz")
    with pytest.raises(InputError) as exc:
        ingest_bids(tmp_path / "notbids")
    msg = str(exc.value)
    assert "no BIDS subjects" in msg and "sub-<label>[_ses-<label>]_T1w.nii[.gz]" in msg and "notbids" in msg


def test_cli_brats_writes_loadable_valid_sheet(tmp_path, capsys):
    root = brats_tree(tmp_path / "brats", nifti=True)
    out = tmp_path / "sheets" / "brats.tsv"
    assert main(["brats", str(root), "-o", str(out), "--split", "val"]) == 0
    df = load_sheet(out, ["t1", "t2", "flair"])
    assert list(df.index) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert set(df["split"]) == {"val"} and set(df["site"]) == {"brats"}
    summary = validate_cohort(df, ["t1", "t2", "flair"], LabelSchema(), label_maps={"brats": BRATS_LABEL_MAP})
    assert list(summary["label_values"]) == ["0 1 2 4", "0 1 2 4"]


def test_cli_bids_and_error_exit(tmp_path, capsys):
    root = tmp_path / "bids"
    touch(root / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_T1w.nii.gz")
    out = tmp_path / "bids.tsv"
    assert main(["bids", str(root), "-o", str(out), "--site", "kcl"]) == 0
    df = load_sheet(out, ["t1"])
    assert list(df.index) == ["sub-01_ses-a"] and df.iloc[0]["site"] == "kcl"

    assert main(["bids", str(tmp_path / "missing"), "-o", str(tmp_path / "x.tsv")]) == 1
    assert "ERROR:" in capsys.readouterr().err
    assert not (tmp_path / "x.tsv").exists()
