"""BraTS and BIDS layouts -> sample sheet rows; CLI writes a loadable sheet."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainsynth.errors import InputError
from brainsynth.ingest import BIDS_EXTRA_COLUMNS, BRATS_LABEL_MAP, ingest_bids, ingest_brats, main
from brainsynth.labels import LabelSchema
from brainsynth.sheet import SHEET_COLUMNS, load_sheet, write_sheet
from brainsynth.validate import validate_cohort


def touch(path, nifti=False, arr=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if nifti:
        data = arr if arr is not None else np.random.default_rng(0).random((6, 6, 6), np.float32)
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

    df = ingest_bids(root, split="val", sessions="all")
    assert list(df.columns) == SHEET_COLUMNS + BIDS_EXTRA_COLUMNS
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
    assert r.loc["sub-02_ses-02", "t1"].endswith("sub-02_ses-02_run-2_T1w.nii.gz")  # highest run
    assert list(df["session"]) == [None, "ses-01", "ses-02"]
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
    assert list(df.index) == ["sub-01"] and df.iloc[0]["site"] == "kcl" and df.iloc[0]["session"] == "ses-a"
    assert main(["bids", str(root), "-o", str(out), "--sessions", "all"]) == 0
    assert list(load_sheet(out, ["t1"]).index) == ["sub-01_ses-a"]

    assert main(["bids", str(tmp_path / "missing"), "-o", str(tmp_path / "x.tsv")]) == 1
    assert "ERROR:" in capsys.readouterr().err
    assert not (tmp_path / "x.tsv").exists()


# ----------------------------------------------------------------- realistic BIDS (ADNI/OASIS/ABIDE-like)
T1_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
FLAIR_AFFINE = np.array([[1.5, 0, 0, -4], [0, 1.2, 0, -3], [0, 0, 2.0, -5], [0, 0, 0, 1]])

# (relative path, kind): "t1" 8x8x8 on the T1 grid, "flair" 6x7x5 on its own grid,
# "label" uint8 on the T1 grid, "text" an empty non-NIfTI file.
REALISTIC_BIDS = [
    ("dataset_description.json", "text"),
    ("participants.tsv", "text"),
    ("README", "text"),
    (".bidsignore", "text"),
    # sub-01: two sessions with a T1w -> ses-01; runs 1, 2 and a rec- variant of run 3 -> run-2
    ("sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w.nii.gz", "t1"),
    ("sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w.json", "text"),
    ("sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz", "t1"),
    ("sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.json", "text"),
    ("sub-01/ses-01/anat/sub-01_ses-01_rec-norm_run-3_T1w.nii.gz", "t1"),
    ("sub-01/ses-01/anat/sub-01_ses-01_run-9_T1w.mgz", "text"),              # not NIfTI
    ("sub-01/ses-01/anat/._sub-01_ses-01_run-8_T1w.nii.gz", "text"),         # macOS dotfile
    ("sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz", "t1"),
    ("sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz", "flair"),
    ("sub-01/ses-01/anat/sub-01_ses-01_FLAIR.json", "text"),
    ("sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz", "t1"),
    ("sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz", "flair"),
    # sub-02: ses-01 has no T1w -> ses-02, whose T2w is missing (never taken from ses-01)
    ("sub-02/ses-01/anat/sub-02_ses-01_T2w.nii.gz", "t1"),
    ("sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz", "flair"),
    ("sub-02/ses-02/anat/sub-02_ses-02_T1w.nii.gz", "t1"),
    ("sub-02/ses-02/anat/sub-02_ses-02_T1w.json", "text"),
    ("sub-02/ses-02/anat/sub-02_ses-02_FLAIR.nii.gz", "flair"),
    ("sub-02/ses-02/anat/sub-02_ses-02_FLAIR.nii", "flair"),  # same entities: sorted name -> .nii
    # sub-03: no sessions, two acq- variants -> acq-fspgr (sorted); no FLAIR
    ("sub-03/anat/sub-03_acq-mprage_T1w.nii.gz", "t1"),
    ("sub-03/anat/sub-03_acq-fspgr_T1w.nii.gz", "t1"),
    ("sub-03/anat/sub-03_acq-fspgr_T1w.json", "text"),
    ("sub-03/anat/sub-03_T2w.nii.gz", "t1"),
    # sub-04: a file without acq- beats acq-mprage; FLAIR acq-ax before acq-sag
    ("sub-04/anat/sub-04_T1w.nii.gz", "t1"),
    ("sub-04/anat/sub-04_acq-mprage_T1w.nii.gz", "t1"),
    ("sub-04/anat/sub-04_acq-sag_FLAIR.nii.gz", "flair"),
    ("sub-04/anat/sub-04_acq-ax_FLAIR.nii.gz", "flair"),
    # sub-06: no T1w in any session -> skipped with a warning
    ("sub-06/ses-01/anat/sub-06_ses-01_T2w.nii.gz", "t1"),
    ("sub-06/ses-02/anat/sub-06_ses-02_FLAIR.nii.gz", "flair"),
    ("sub-06/ses-02/func/sub-06_ses-02_task-rest_bold.nii.gz", "t1"),
    # decoys outside the raw tree
    ("derivatives/fmriprep/sub-01/ses-01/anat/sub-01_ses-01_desc-preproc_T1w.nii.gz", "t1"),
    ("derivatives/fmriprep/sub-01/anat/sub-01_T1w.nii.gz", "t1"),
    ("derivatives/fmriprep/sub-05/anat/sub-05_T1w.nii.gz", "t1"),
    ("sourcedata/sub-01/ses-01/anat/sub-01_ses-01_run-5_T1w.nii.gz", "t1"),
    ("sourcedata/sub-05/anat/sub-05_T1w.nii.gz", "t1"),
    (".heudiconv/sub-05/anat/sub-05_T1w.nii.gz", "t1"),
    # labels: only the one on the chosen T1w's grid (run-2, native space) may be used
    ("derivatives/seg/sub-01/ses-01/anat/sub-01_ses-01_run-1_dseg.nii.gz", "label"),
    ("derivatives/seg/sub-01/ses-01/anat/sub-01_ses-01_run-2_dseg.nii.gz", "label"),
    ("derivatives/seg/sub-01/ses-01/anat/sub-01_ses-01_space-MNI152NLin2009cAsym_dseg.nii.gz", "label"),
    ("derivatives/seg/sub-01/ses-01/anat/sub-01_ses-01_run-2_dseg.json", "text"),
    ("derivatives/seg/sub-03/anat/sub-03_space-MNI152NLin2009cAsym_dseg.nii.gz", "label"),  # template grid
    ("derivatives/seg/sub-04/anat/sub-04_acq-mprage_desc-brain_mask.nii.gz", "label"),
    ("derivatives/seg/sub-04/anat/sub-04_desc-brain_mask.nii.gz", "label"),
]


def make_bids(root, seed=None):
    """Write REALISTIC_BIDS under root, in listed order or shuffled by ``seed``."""
    import random

    entries = list(REALISTIC_BIDS)
    if seed is not None:
        random.Random(seed).shuffle(entries)
    for rel, kind in entries:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "text":
            path.write_text("{}\n" if rel.endswith(".json") else "")
        elif kind == "flair":
            nib.save(nib.Nifti1Image(np.ones((6, 7, 5), np.float32), FLAIR_AFFINE), str(path))
        elif kind == "label":
            nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), T1_AFFINE), str(path))
        else:
            nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), T1_AFFINE), str(path))
    return root


def picked(df, root):
    """{subject: {column: path relative to root or None}} plus session and bids_choice."""
    out = {}
    for i in range(len(df)):
        r = df.iloc[i]  # (iterrows would turn None into NaN)
        row = {c: (str(Path(r[c]).relative_to(root)) if r[c] else None)
               for c in ("t1", "t1ce", "t2", "flair", "label", "brain_mask")}
        row.update(session=r["session"], bids_choice=r["bids_choice"])
        out[r["subject"]] = row
    return out


EXPECTED_DEFAULT = {
    "sub-01": dict(t1="sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz", t1ce=None,
                   t2="sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz",
                   flair="sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz",
                   label="derivatives/seg/sub-01/ses-01/anat/sub-01_ses-01_run-2_dseg.nii.gz",
                   brain_mask=None,
                   session="ses-01", bids_choice="t1=run-2 (3 candidates); t2=-; flair=-; label=seg:run-2"),
    "sub-02": dict(t1="sub-02/ses-02/anat/sub-02_ses-02_T1w.nii.gz", t1ce=None, t2=None,
                   flair="sub-02/ses-02/anat/sub-02_ses-02_FLAIR.nii", label=None, brain_mask=None,
                   session="ses-02", bids_choice="t1=-; flair=- (2 candidates)"),
    "sub-03": dict(t1="sub-03/anat/sub-03_acq-fspgr_T1w.nii.gz", t1ce=None,
                   t2="sub-03/anat/sub-03_T2w.nii.gz",
                   flair=None, label=None, brain_mask=None,
                   session=None, bids_choice="t1=acq-fspgr (2 candidates); t2=-"),
    "sub-04": dict(t1="sub-04/anat/sub-04_T1w.nii.gz", t1ce=None, t2=None,
                   flair="sub-04/anat/sub-04_acq-ax_FLAIR.nii.gz", label=None,
                   brain_mask="derivatives/seg/sub-04/anat/sub-04_desc-brain_mask.nii.gz", session=None,
                   bids_choice="t1=- (2 candidates); flair=acq-ax (2 candidates); brain_mask=seg:desc-brain"),
}


def test_bids_realistic_layout_picks(tmp_path, caplog):
    root = make_bids(tmp_path / "oasis")
    with caplog.at_level("INFO", logger="brainsynth.ingest"):
        df = ingest_bids(root)
    assert BIDS_EXTRA_COLUMNS == ["session", "bids_choice"]
    assert list(df.columns) == SHEET_COLUMNS + BIDS_EXTRA_COLUMNS
    assert list(df["subject"]) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert picked(df, root) == EXPECTED_DEFAULT
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "sub-06 has no T1w image" in warnings[0]
    assert "sub-06/ses-01/anat" in warnings[0] and "sub-06/ses-02/anat" in warnings[0]
    # The FLAIR keeps its own grid: the ingest neither rejects nor resamples it.
    flair = nib.load(df.set_index("subject").loc["sub-01", "flair"])
    assert flair.shape == (6, 7, 5) and np.allclose(flair.affine, FLAIR_AFFINE)


def test_bids_realistic_acq_preference_and_all_sessions(tmp_path, caplog):
    root = make_bids(tmp_path / "adni")
    df = ingest_bids(root, acq={"T1w": "acq-mprage", "flair": "sag"})
    p = picked(df, root)
    assert p["sub-03"]["t1"] == "sub-03/anat/sub-03_acq-mprage_T1w.nii.gz"
    assert p["sub-04"]["t1"] == "sub-04/anat/sub-04_acq-mprage_T1w.nii.gz"
    assert p["sub-04"]["flair"] == "sub-04/anat/sub-04_acq-sag_FLAIR.nii.gz"
    # the mask that names acq-mprage now matches the chosen T1w and is more specific
    assert p["sub-04"]["brain_mask"] == "derivatives/seg/sub-04/anat/sub-04_acq-mprage_desc-brain_mask.nii.gz"
    assert p["sub-04"]["bids_choice"] == ("t1=acq-mprage (2 candidates); flair=acq-sag (2 candidates); "
                                          "brain_mask=seg:acq-mprage_desc-brain")
    # no acq-mprage in sub-01: the default order applies and the sheet says so
    assert p["sub-01"]["t1"] == EXPECTED_DEFAULT["sub-01"]["t1"]
    assert p["sub-01"]["bids_choice"].startswith("t1=run-2 (3 candidates, no acq-mprage); ")
    assert p["sub-02"]["bids_choice"] == "t1=- (no acq-mprage); flair=- (2 candidates, no acq-sag)"

    with caplog.at_level("WARNING", logger="brainsynth.ingest"):
        df = ingest_bids(root, sessions="all")
    p = picked(df, root)
    assert list(p) == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-02", "sub-03", "sub-04"]
    assert p["sub-01_ses-02"]["t1"] == "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz"
    assert p["sub-01_ses-02"]["session"] == "ses-02" and p["sub-01_ses-02"]["label"] is None
    assert p["sub-01_ses-01"] == EXPECTED_DEFAULT["sub-01"]
    assert any("sub-02 ses-01 has no T1w" in r.getMessage() for r in caplog.records)

    for bad, match in [(dict(sessions="each"), "sessions 'each'"),
                       (dict(acq={"pd": "x"}), "unknown modality"),
                       (dict(acq={"t1": "mp rage"}), "not a BIDS label")]:
        with pytest.raises(InputError, match=match):
            ingest_bids(root, **bad)


def test_bids_sessions_sorted_by_number(tmp_path):
    root = tmp_path / "adni"
    for ses in ("ses-M108", "ses-M12", "ses-M06"):
        touch(root / "sub-01" / ses / "anat" / f"sub-01_{ses}_T1w.nii.gz")
    (root / "sub-01" / "ses-M06" / "anat" / "sub-01_ses-M06_T1w.nii.gz").unlink()
    df = ingest_bids(root)
    assert list(df["session"]) == ["ses-M12"]  # plain string order would give ses-M108


def test_bids_realistic_deterministic(tmp_path, monkeypatch):
    """Same tree, other creation and directory-listing order -> byte-identical sheet."""
    import pathlib
    import random

    def sheet_text(root, seed):
        rng = random.Random(seed)
        real_iterdir = pathlib.Path.iterdir

        def shuffled_iterdir(self):
            items = list(real_iterdir(self))
            rng.shuffle(items)
            return iter(items)

        with monkeypatch.context() as m:
            m.setattr(pathlib.Path, "iterdir", shuffled_iterdir)
            df = ingest_bids(root, site="s1")
        out = root.parent / f"{root.name}.tsv"
        write_sheet(df, out)
        return out.read_text().replace(str(root), "ROOT"), out

    texts = []
    for n, seed in enumerate([None, 1, 2, 3]):
        root = make_bids(tmp_path / f"ds{n}" / "bids", seed=seed)
        text, out = sheet_text(root, seed=n + 10)
        texts.append(text)
    assert all(t == texts[0] for t in texts[1:])
    assert "ROOT/sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz" in texts[0]

    df = load_sheet(out, ["t1"])
    assert list(df.index) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert list(df.columns) == SHEET_COLUMNS + BIDS_EXTRA_COLUMNS
    assert list(df["session"]) == ["ses-01", "ses-02", None, None]
    assert df.loc["sub-03", "flair"] is None
    assert df.loc["sub-03", "bids_choice"] == "t1=acq-fspgr (2 candidates); t2=-"


def test_cli_bids_options(tmp_path):
    root = make_bids(tmp_path / "abide")
    out = tmp_path / "abide.tsv"
    assert main(["bids", str(root), "-o", str(out), "--sessions", "all", "--acq", "t1=mprage"]) == 0
    df = load_sheet(out, ["t1"])
    assert list(df.index) == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-02", "sub-03", "sub-04"]
    assert df.loc["sub-03", "t1"] == str(root / "sub-03" / "anat" / "sub-03_acq-mprage_T1w.nii.gz")
    assert main(["bids", str(root), "-o", str(tmp_path / "y.tsv"), "--acq", "mprage"]) == 1
    assert not (tmp_path / "y.tsv").exists()
