"""Image checks: existence, NIfTI, dimensionality, finiteness, labels, geometry."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth.errors import InputError, InputErrors
from brainsynth.ingest import BRATS_LABEL_MAP
from brainsynth.labels import LabelSchema
from brainsynth.validate import apply_label_map, check_subject, validate_cohort

MODS = ["t1", "t2", "flair"]
SCHEMA = LabelSchema()
SHAPE = (8, 8, 8)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path, arr, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


def make_subject(tmp_path, sid="s01", site="site_a", label_values=(0, 1, 2, 3)):
    d = tmp_path / sid
    d.mkdir()
    rng = np.random.default_rng(0)
    row = {"subject": sid, "site": site, "split": "train"}
    for m in MODS:
        row[m] = save(d / f"{sid}_{m}.nii.gz", rng.random(SHAPE, dtype=np.float32))
    lab = np.resize(np.array(label_values, dtype=np.uint8), SHAPE)
    row["label"] = save(d / f"{sid}_seg.nii.gz", lab)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    row["brain_mask"] = save(d / f"{sid}_mask.nii.gz", mask)
    return row


def messages(errors):
    return "\n".join(str(e) for e in errors)


def only_error(row, label_map=None):
    errs = check_subject(row, MODS, SCHEMA, label_map)
    assert len(errs) == 1, messages(errs)
    return str(errs[0])


def test_good_cohort_passes(tmp_path):
    rows = [make_subject(tmp_path, "s01"), make_subject(tmp_path, "s02", "site_b")]
    rows[1]["brain_mask"] = None
    assert check_subject(rows[0], MODS, SCHEMA) == []
    summary = validate_cohort(pd.DataFrame(rows), MODS, SCHEMA)
    assert list(summary["subject"]) == ["s01", "s02"]
    assert summary.loc[0, "shape"] == "8x8x8" and summary.loc[0, "voxel_mm"] == "2x2x2"
    assert summary.loc[0, "label_values"] == "0 1 2 3"


def test_missing_file(tmp_path):
    row = make_subject(tmp_path)
    row["t2"] = str(tmp_path / "s01" / "nope_t2.nii.gz")
    msg = only_error(row)
    assert "'s01'" in msg and "nope_t2.nii.gz" in msg and "does not exist" in msg and "'t2'" in msg


@pytest.mark.parametrize("name,content", [
    ("fake_flair.nii.gz", b"just some text, not an image\n"),
    ("fake_flair.nii", b"just some text, not an image\n"),
    ("fake_flair.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
])
def test_not_a_nifti(tmp_path, name, content):
    row = make_subject(tmp_path)
    p = tmp_path / "s01" / name
    p.write_bytes(content)
    row["flair"] = str(p)
    msg = only_error(row)
    assert "'s01'" in msg and name in msg and "not a NIfTI image" in msg and "dcm2niix" in msg


def test_2d_image(tmp_path):
    row = make_subject(tmp_path)
    row["t2"] = save(tmp_path / "s01" / "slice_t2.nii.gz", np.ones((8, 8), np.float32))
    msg = only_error(row)
    assert "'s01'" in msg and "slice_t2.nii.gz" in msg and "2D image" in msg


def test_4d_single_volume_ok_true_4d_error(tmp_path):
    row = make_subject(tmp_path)
    row["t2"] = save(tmp_path / "s01" / "one_t2.nii.gz", np.random.default_rng(1).random(SHAPE + (1,), np.float32))
    assert check_subject(row, MODS, SCHEMA) == []
    row["t2"] = save(tmp_path / "s01" / "many_t2.nii.gz", np.ones(SHAPE + (3,), np.float32))
    msg = only_error(row)
    assert "'s01'" in msg and "many_t2.nii.gz" in msg and "4D image with 3 volumes" in msg


def test_nan_and_inf(tmp_path):
    row = make_subject(tmp_path)
    arr = np.ones(SHAPE, np.float32)
    arr[0, 0, :2] = np.nan
    arr[1, 1, 1] = np.inf
    row["t1"] = save(tmp_path / "s01" / "nan_t1.nii.gz", arr)
    msg = only_error(row)
    assert "'s01'" in msg and "nan_t1.nii.gz" in msg and "3 NaN/Inf voxel(s)" in msg


def test_label_values_not_in_schema(tmp_path):
    row = make_subject(tmp_path, site="siteX", label_values=(0, 1, 12, 40))
    msg = only_error(row)
    assert "'s01'" in msg and "s01_seg.nii.gz" in msg and "not in the label schema" in msg
    assert "12 (" in msg and "40 (" in msg
    assert "add a label_map for site 'siteX' in config" in msg and "fix the label file" in msg


def test_label_map_applied(tmp_path):
    row = make_subject(tmp_path, site="brats", label_values=(0, 1, 2, 4))
    assert check_subject(row, MODS, SCHEMA, BRATS_LABEL_MAP) == []
    assert check_subject(row, MODS, SCHEMA, "brats") == []
    # 3 is not a BraTS value: unknown under the map even though 3 is a schema class.
    row3 = make_subject(tmp_path, "s02", site="brats", label_values=(0, 1, 3))
    msg = only_error(row3, BRATS_LABEL_MAP)
    assert "'s02'" in msg and "s02_seg.nii.gz" in msg and "label_map of site 'brats'" in msg and "3 (" in msg

    arr = np.array([[0, 1], [2, 4]], dtype=np.int16)
    out = apply_label_map(arr, BRATS_LABEL_MAP, SCHEMA)
    c = SCHEMA.classes
    assert out.tolist() == [[0, c["necrotic"]], [c["oedema"], c["enhancing"]]]
    assert out.dtype == np.uint8
    assert apply_label_map(np.array([0.0, 2.0, 4.0]), {"2": "gm", 4.0: "wm"}, SCHEMA).tolist() == [0, 2, 3]
    assert apply_label_map(arr, None, SCHEMA).tolist() == arr.tolist()
    with pytest.raises(InputError, match=r"label values \[3\]"):
        apply_label_map(np.array([0, 3]), BRATS_LABEL_MAP, SCHEMA)
    with pytest.raises(InputError, match="non-integer"):
        apply_label_map(np.array([0.0, 0.5]), None, SCHEMA)


def test_bad_label_map_in_config(tmp_path):
    rows = [make_subject(tmp_path, site="brats", label_values=(0, 1, 2, 4))]
    with pytest.raises(InputErrors) as exc:
        validate_cohort(pd.DataFrame(rows), MODS, SCHEMA,
                        label_maps={"brats": {1: "necrosis"}})
    msg = str(exc.value)
    assert "'necrosis'" in msg and "brats" in msg and "labels.classes" in msg


def test_non_integer_label(tmp_path):
    row = make_subject(tmp_path)
    lab = np.zeros(SHAPE, np.float32)
    lab[0, 0, 0] = 1.5
    row["label"] = save(tmp_path / "s01" / "interp_seg.nii.gz", lab)
    msg = only_error(row)
    assert "'s01'" in msg and "interp_seg.nii.gz" in msg and "non-integer" in msg and "nearest-neighbour" in msg


def test_geometry_mismatch_shape(tmp_path):
    row = make_subject(tmp_path)
    row["label"] = save(tmp_path / "s01" / "big_seg.nii.gz", np.ones((8, 8, 9), np.uint8))
    msg = only_error(row)
    assert "'s01'" in msg and "big_seg.nii.gz" in msg and "s01_t1.nii.gz" in msg
    assert "geometry mismatch" in msg and "8x8x9" in msg and "8x8x8" in msg and "2x2x2 mm" in msg


def test_modality_on_its_own_grid_is_accepted_label_must_match_its_image(tmp_path):
    row = make_subject(tmp_path)
    rng = np.random.default_rng(1)
    aff = np.diag([4.5, 4.5, 4.5, 1.0])
    aff[:3, 3] = [1.0, -2.0, 0.5]
    row["flair"] = save(tmp_path / "s01" / "coarse_flair.nii.gz", rng.random((5, 5, 4), np.float32), aff)
    assert check_subject(row, MODS, SCHEMA) == []  # co-registered during preprocessing
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    row["label"] = save(tmp_path / "s01" / "moved_seg.nii.gz", np.resize(np.uint8([0, 1, 2]), SHAPE), shifted)
    msg = only_error(row)
    assert "'s01'" in msg and "moved_seg.nii.gz" in msg and "s01_t1.nii.gz" in msg and "affine" in msg
    assert "label_space" in msg
    shifted[0, 3] = AFFINE[0, 3] + 1e-4  # within tolerance
    row["label"] = save(tmp_path / "s01" / "ok_seg.nii.gz", np.resize(np.uint8([0, 1, 2]), SHAPE), shifted)
    assert check_subject(row, MODS, SCHEMA) == []
    zoomed = np.diag([1.0, 1.0, 1.0, 1.0])
    row["brain_mask"] = save(tmp_path / "s01" / "fine_mask.nii.gz", np.ones(SHAPE, np.uint8), zoomed)
    msg = only_error(row)
    assert "fine_mask.nii.gz" in msg and "voxel 1x1x1 mm" in msg and "voxel 2x2x2 mm" in msg


def test_label_space_names_the_grid_of_the_label_map(tmp_path):
    row = make_subject(tmp_path)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    row["flair"] = save(tmp_path / "s01" / "coarse_flair.nii.gz", np.random.default_rng(2).random((4, 4, 4),
                                                                                                  np.float32), aff)
    row["label"] = save(tmp_path / "s01" / "flair_seg.nii.gz", np.resize(np.uint8([0, 1, 2]), (4, 4, 4)), aff)
    row["brain_mask"] = save(tmp_path / "s01" / "flair_mask.nii.gz", np.ones((4, 4, 4), np.uint8), aff)
    errs = check_subject(row, MODS, SCHEMA)
    assert {e.field for e in errs} == {"label", "brain_mask"}, messages(errs)
    row["label_space"] = "flair"
    assert check_subject(row, MODS, SCHEMA) == []
    row["label_space"] = "pd"
    msg = messages(check_subject(row, MODS, SCHEMA))
    assert "label_space 'pd'" in msg and "'s01'" in msg


@pytest.mark.parametrize("content,words", [
    (np.zeros(SHAPE, np.float32), ["all-zero"]),
    (np.full(SHAPE, 3.0, np.float32), ["constant", "3"]),
    (np.zeros((20, 20, 20), np.float32), ["non-zero on only", "almost empty"]),
])
def test_image_without_content_is_named(tmp_path, content, words):
    row = make_subject(tmp_path)
    if content.shape == (20, 20, 20):
        content[10, 10, 10] = 5.0  # one voxel of 8000: 0.0125%
        row["t1"] = save(tmp_path / "s01" / "empty_t1.nii.gz", content)
        row["t2"] = save(tmp_path / "s01" / "t2_20.nii.gz", np.random.default_rng(3).random(content.shape,
                                                                                             np.float32))
        row["flair"] = row["t2"]
        row.pop("label")
        row.pop("brain_mask")
    else:
        row["t1"] = save(tmp_path / "s01" / "empty_t1.nii.gz", content)
    msg = only_error(row)
    assert "'s01'" in msg and "empty_t1.nii.gz" in msg and "field 't1'" in msg and "fix:" in msg
    for w in words:
        assert w in msg, msg


def test_integer_images_are_content_checked_too(tmp_path):
    row = make_subject(tmp_path)
    row["t2"] = save(tmp_path / "s01" / "zero_t2.nii.gz", np.zeros(SHAPE, np.int16))
    msg = only_error(row)
    assert "zero_t2.nii.gz" in msg and "all-zero" in msg


def test_label_map_without_tissue_is_rejected(tmp_path):
    row = make_subject(tmp_path, label_values=(0, SCHEMA.value("oedema")))
    msg = only_error(row)
    assert "'s01'" in msg and "s01_seg.nii.gz" in msg and "no tissue" in msg and "oedema" in msg
    row = make_subject(tmp_path, "s02", label_values=(0,))
    assert "no tissue" in only_error(row)


def test_empty_brain_mask(tmp_path):
    row = make_subject(tmp_path)
    row["brain_mask"] = save(tmp_path / "s01" / "empty_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    msg = only_error(row)
    assert "'s01'" in msg and "empty_mask.nii.gz" in msg and "empty" in msg


def test_cohort_reports_everything_at_once(tmp_path):

    good = make_subject(tmp_path, "s01")
    bad = make_subject(tmp_path, "s02", label_values=(0, 15))
    bad["t2"] = str(tmp_path / "missing_t2.nii.gz")
    bad["flair"] = None
    with pytest.raises(InputErrors) as exc:
        validate_cohort(pd.DataFrame([good, bad]), MODS, SCHEMA)
    errs = exc.value.errors
    assert len(errs) == 3
    assert all(e.subject == "s02" for e in errs)
    assert {e.field for e in errs} == {"t2", "flair", "label"}


def test_site_modalities_check_what_each_site_delivers(tmp_path):
    """A FLAIR-only site (config site_modalities): its subjects need their FLAIR only, their label
    map lies on the FLAIR grid by default; other sites still need every modality."""
    flair_only = make_subject(tmp_path, "s02", "site_c")
    flair_only["t1"] = flair_only["t2"] = None
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = 5.0  # the FLAIR (and its label) on a grid of their own: no T1 to agree with
    arr = nib.load(flair_only["flair"]).get_fdata()
    flair_only["flair"] = save(tmp_path / "s02" / "moved_flair.nii.gz", arr.astype(np.float32), shifted)
    for key in ("label", "brain_mask"):
        data = np.asarray(nib.load(flair_only[key]).dataobj)
        flair_only[key] = save(tmp_path / "s02" / f"moved_{key}.nii.gz", data, shifted)
    short = make_subject(tmp_path, "s01")
    short["t2"] = None
    with pytest.raises(InputErrors) as exc:
        validate_cohort(pd.DataFrame([short, flair_only]), MODS, SCHEMA, site_modalities={"site_c": ["flair"]})
    assert len(exc.value.errors) == 1
    msg = str(exc.value.errors[0])
    assert "'s01'" in msg and "no t2 image" in msg and "site_modalities" in msg
    short["t2"] = short["t1"]
    summary = validate_cohort(pd.DataFrame([short, flair_only]), MODS, SCHEMA,
                              site_modalities={"site_c": ["flair"]})
    assert list(summary["subject"]) == ["s01", "s02"] and summary.loc[1, "shape"] == "8x8x8"
    # without the entry the FLAIR-only subject is named for the T1 and T2 it lacks
    with pytest.raises(InputErrors) as exc:
        validate_cohort(pd.DataFrame([short, flair_only]), MODS, SCHEMA)
    msgs = messages(exc.value.errors)
    assert "'s02'" in msgs and "no t1 image" in msgs and "no t2 image" in msgs
