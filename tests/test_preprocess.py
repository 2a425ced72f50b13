"""Preprocessing functions on small synthetic volumes, with the real ANTs."""

import json
import tempfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth import preprocess as pp
from brainsynth.errors import InputError
from brainsynth.labels import LabelSchema
from brainsynth.io import atomic_dir, save_nifti


def _ellipsoid(shape, centre, radii):
    grid = np.indices(shape).astype(float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return d <= 1.0


def _head(shape=(40, 44, 40), shift=(0, 0, 0)):
    """A toy head: bright brain ellipsoid with a darker core, skull ring, bright scalp."""
    c = [s / 2 + d for s, d in zip(shape, shift)]
    brain = _ellipsoid(shape, c, (12, 14, 11))
    core = _ellipsoid(shape, c, (6, 7, 5))
    skull = _ellipsoid(shape, c, (15, 17, 14)) & ~brain
    scalp = _ellipsoid(shape, c, (17, 19, 16)) & ~skull & ~brain
    img = np.zeros(shape, np.float32)
    img[brain] = 1.0
    img[core] = 0.5
    img[skull] = 0.1
    img[scalp] = 0.9
    return img, brain


@pytest.fixture()
def pair(tmp_path):
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    fixed, fixed_brain = _head()
    moving, moving_brain = _head(shift=(2, -2, 1))
    rng = np.random.default_rng(0)
    moving = moving + rng.normal(0, 0.01, moving.shape).astype(np.float32)
    paths = {
        "fixed": save_nifti(fixed, aff, tmp_path / "fixed.nii.gz"),
        "fixed_mask": save_nifti(fixed_brain.astype(np.uint8), aff, tmp_path / "fixed_mask.nii.gz"),
        "moving": save_nifti(moving, aff, tmp_path / "moving.nii.gz"),
        "moving_mask": save_nifti(moving_brain.astype(np.uint8), aff, tmp_path / "moving_mask.nii.gz"),
    }
    return tmp_path, paths


def test_normalise_intensity_scales_brain_and_zeros_outside():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.zeros_like(data, bool)
    mask[2:8, 2:8, 2:8] = True
    out = pp.normalise_intensity(data, mask, 1, 99)
    assert out.dtype == np.float32
    assert out[~mask].max() == 0.0
    assert 0.0 <= out[mask].min() < 0.05 and 0.95 < out[mask].max() <= 1.0


def test_probabilistic_maps_sum_to_one_and_keep_argmax():
    schema = LabelSchema()
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:15, 5:15, 5:15] = schema.value("wm")
    lab[8:12, 8:12, 8:12] = schema.value("wmh")
    prob = pp.probabilistic_from_labels(lab, schema, (2.0, 2.0, 2.0), sigma_mm=2.0)
    assert prob.shape == lab.shape + (schema.n_classes,)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
    assert (prob.min() >= 0) and (prob.max() <= 1 + 1e-6)
    assert np.array_equal(np.argmax(prob, -1)[10, 10, 10], schema.value("wmh"))
    # smoothing makes the edge voxels mixed, not one-hot
    assert 0.1 < prob[5, 10, 10, schema.value("wm")] < 0.9


def test_refine_mask_keeps_largest_component_and_fills_holes():
    m = _ellipsoid((30, 30, 30), (15, 15, 15), (8, 8, 8))
    m[15, 15, 15] = False  # hole
    m[1, 1, 1] = True  # speck
    out = pp.refine_mask(m, closing_voxels=1)
    assert out[15, 15, 15] and not out[1, 1, 1]


def test_dice_edge_cases():
    a = np.zeros((4, 4), bool)
    assert pp.dice(a, a) == 1.0
    b = a.copy()
    b[0, 0] = True
    assert pp.dice(a, b) == 0.0
    assert pp.dice(b, b) == 1.0


def test_lesion_proportions_divide_by_cohort_max_and_skip_unlabelled():
    schema = LabelSchema()
    recs = [
        {"subject": "a", "n_wmh": 10, "n_tumour": 0, "has_label": True},
        {"subject": "b", "n_wmh": 40, "n_tumour": 200, "has_label": True},
        {"subject": "c", "n_wmh": 0, "n_tumour": 0, "has_label": False},
    ]
    df = pp.lesion_proportions(recs, schema).set_index("subject")
    assert df.loc["a", "dc_wmh"] == pytest.approx(0.25)
    assert df.loc["b", "dc_wmh"] == pytest.approx(1.0)
    assert df.loc["b", "dc_tumour"] == pytest.approx(1.0)
    assert df.loc["a", "dc_tumour"] == 0.0
    assert np.isnan(df.loc["c", "dc_wmh"])


def test_n4_register_skull_strip_and_grid(pair):
    tmp, p = pair
    pp.set_threads(1)
    n4 = pp.n4_correct(p["moving"], tmp / "n4.nii.gz", shrink_factor=2, iterations=(10, 5))
    assert nib.load(str(n4)).shape == nib.load(str(p["moving"])).shape
    reg = pp.register(n4, p["fixed"], tmp / "aff.mat", tmp / "warp.nii.gz", tmp / "iwarp.nii.gz",
                      tmp / "warped.nii.gz", transform="SyN", syn_iterations=(20, 10, 0),
                      affine_iterations=(100, 50, 0), seed=1)
    assert all(v.exists() for v in reg.values())
    mask = pp.skull_strip(n4, p["fixed_mask"], reg["affine"], reg["inverse_warp"], tmp / "mask.nii.gz")
    truth = nib.load(str(p["moving_mask"])).get_fdata() > 0
    assert pp.dice(mask, truth) > 0.9
    rec = pp.skull_strip_qc(tmp / "mask.nii.gz", p["moving_mask"], tmp / "qc.json", "s1")
    assert rec == json.loads((tmp / "qc.json").read_text())
    assert rec["skull_strip_dice"] > 0.9
    gmask, lab = pp.to_working_grid(
        {"t1": n4}, tmp / "mask.nii.gz", reg["affine"], reg["warp"], p["fixed"],
        {"t1": tmp / "grid_t1.nii.gz"}, tmp / "grid_mask.nii.gz",
        label=p["moving_mask"], out_label=tmp / "grid_label.nii.gz", schema=LabelSchema(),
    )
    fixed_brain = nib.load(str(p["fixed_mask"])).get_fdata() > 0
    assert pp.dice(gmask, fixed_brain) > 0.9
    assert set(np.unique(lab)) <= {0, 1}
    grid_t1 = nib.load(str(tmp / "grid_t1.nii.gz"))
    assert np.allclose(grid_t1.affine, nib.load(str(p["fixed"])).affine)
    assert grid_t1.get_fdata()[~gmask].max() == 0.0


def test_deformable_registration_without_its_field_fails(pair, monkeypatch):
    """A SyN registration whose warp ANTs does not return is an error, not identity fields."""
    tmp, p = pair
    pp.set_threads(1)
    ants = pp._ants()
    real = ants.registration

    def without_warp(**kwargs):
        reg = real(**kwargs)
        reg["fwdtransforms"] = [t for t in reg["fwdtransforms"] if t.endswith(".mat")]
        return reg

    monkeypatch.setattr(ants, "registration", without_warp)
    with pytest.raises(RuntimeError, match="returned no deformation field"):
        pp.register(p["moving"], p["fixed"], tmp / "x_aff.mat", tmp / "x_warp.nii.gz", tmp / "x_iwarp.nii.gz",
                    tmp / "x_warped.nii.gz", transform="SyN", syn_iterations=(2, 0, 0), affine_iterations=(10, 0),
                    seed=1)
    assert not (tmp / "x_warp.nii.gz").exists()
    reg = pp.register(p["moving"], p["fixed"], tmp / "y_aff.mat", tmp / "y_warp.nii.gz", tmp / "y_iwarp.nii.gz",
                      tmp / "y_warped.nii.gz", transform="Affine", affine_iterations=(10, 0), seed=1)
    assert not np.asarray(nib.load(str(reg["warp"])).dataobj).any()


def test_field_paths_ants_would_misread_are_refused_before_work(pair):
    """ANTs treats a deformation field whose path holds ".h5" / ".mat" / ".txt" / ... as a
    transform file: such a path is an error naming it, and the workflow's own temporary
    folders never make one (their random part follows "tmp-", never a dot)."""
    tmp, p = pair
    bad = tmp / "sub.h5x"
    with pytest.raises(InputError, match="contains '.h5'"):
        pp.register(p["moving"], p["fixed"], bad / "a.mat", bad / "w.nii.gz", bad / "iw.nii.gz", bad / "t.nii.gz")
    assert not bad.exists()
    for _ in range(50):
        with atomic_dir(tmp / "demo038") as d:
            assert d.name.startswith(".demo038.tmp-")
            assert not [m for m in (".h5", ".hdf", ".mat", ".txt", ".xfm") if m in d.name]


def test_atropos_tissue_maps_use_template_priors(tmp_path, monkeypatch):
    schema = LabelSchema()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[4:20, 4:20, 4:20] = schema.value("csf")
    lab[6:18, 6:18, 6:18] = schema.value("gm")
    lab[9:15, 9:15, 9:15] = schema.value("wm")
    intens = {0: 0.0, 1: 0.2, 2: 0.6, 3: 1.0}
    img = np.vectorize(intens.get)(lab).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 0.03, img.shape).astype(np.float32)
    save_nifti(img, aff, tmp_path / "t1.nii.gz")
    save_nifti(lab, aff, tmp_path / "tlab.nii.gz")
    priors = pp.tissue_priors_from_template(tmp_path / "tlab.nii.gz", schema, sigma_mm=1.0)
    priors = {k: priors[k] for k in ("csf", "gm", "wm")}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))   # where antspy would leave its files
    prob = pp.probabilistic_from_atropos(tmp_path / "t1.nii.gz", lab > 0, priors, schema, iterations=3)
    assert list(scratch.iterdir()) == [] and tempfile.gettempdir() == str(scratch)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-4)
    seg = np.argmax(prob, -1)
    agree = (seg == lab)[lab > 0].mean()
    assert agree > 0.9


CFG = {"n4": {"shrink_factor": 2, "iterations": [10, 5]},
       "registration": {"transform": "Affine", "syn_iterations": [10, 0], "affine_iterations": [100, 50, 0]},
       "skull_strip": {"threshold": 0.5, "closing_voxels": 1},
       "normalisation": {"lower_percentile": 1.0, "upper_percentile": 99.0},
       "tissue_maps": {"smoothing_mm": 2.0, "atropos_iterations": 3}}


def test_preprocess_subject_fills_one_folder_atomically(pair):
    tmp, p = pair
    pp.set_threads(1)
    template = {"t1": p["fixed"], "brain_mask": p["fixed_mask"], "labels": p["fixed_mask"]}
    out = tmp / "subjects" / "s1"
    qc = pp.preprocess_subject("s1", {"t1": p["moving"]}, out, template, CFG, LabelSchema(),
                               label=p["moving_mask"], truth_mask=p["moving_mask"], seed=1)
    assert qc["skull_strip_dice"] > 0.9
    files = pp.subject_files(out, ["t1"])
    assert len(files) == 14 and all(f.is_file() for f in files)  # t1 only: coregistration/qc.json, no transform
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == \
        sorted(str(f.relative_to(out)) for f in files)  # nothing else (no temporaries)
    assert list((tmp / "subjects").iterdir()) == [out]
    grid_t1 = nib.load(str(pp.subject_file(out, "image", "t1")))
    assert np.allclose(grid_t1.affine, nib.load(str(p["fixed"])).affine)
    prob = nib.load(str(pp.subject_file(out, "tissue_prob"))).get_fdata()
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-4)
    assert json.loads(pp.subject_file(out, "lesions").read_text())["subject"] == "s1"

    # the table of preprocessed subjects lists the working-grid files; a gap is named
    table = pp.preprocessed_manifest([{"subject": "s1", "folder": str(out), "split": "train"}], ["t1"],
                                     tmp / "train.tsv")
    row = pd.read_csv(table, sep="\t").iloc[0]
    assert row["t1"] == str(out / "grid" / "t1.nii.gz") and row["split"] == "train"
    pp.subject_file(out, "montage").unlink()
    with pytest.raises(InputError, match="s1 lacks 1 file.*qc.png") as err:
        pp.preprocessed_manifest([{"subject": "s1", "folder": str(out)}], ["t1"], tmp / "x.tsv")
    assert "delete the folder" in str(err.value) and not (tmp / "x.tsv").exists()

    # a failure half-way (no template mask) leaves no folder under the subject's name
    with pytest.raises(Exception):
        pp.preprocess_subject("s2", {"t1": p["moving"]}, tmp / "subjects" / "s2",
                              dict(template, brain_mask=tmp / "missing.nii.gz"), CFG, LabelSchema(), seed=1)
    assert sorted(q.name for q in (tmp / "subjects").iterdir()) == ["s1"]


def test_subject_without_t1_is_anchored_on_its_first_modality(pair):
    """A FLAIR-only subject (config site_modalities): registration, skull stripping and the QC
    montage run on the FLAIR; with a second modality on another grid, that one is co-registered
    to the FLAIR; the split table leaves the missing T1 empty."""
    tmp, p = pair
    pp.set_threads(1)
    template = {"t1": p["fixed"], "brain_mask": p["fixed_mask"], "labels": p["fixed_mask"]}
    moved = nib.load(str(p["moving"]))
    aff = moved.affine.copy()
    aff[:3, 3] += [4.0, -3.0, 2.0]
    t2 = save_nifti(np.asarray(moved.dataobj)[::-1] * 0.7 + 0.1, aff, tmp / "t2_own_grid.nii.gz")
    out = tmp / "subjects" / "f1"
    qc = pp.preprocess_subject("f1", {"flair": p["moving"], "t2": t2}, out, template, CFG, LabelSchema(),
                               label=p["moving_mask"], truth_mask=p["moving_mask"], seed=1)
    assert qc["skull_strip_dice"] > 0.9
    files = pp.subject_files(out, ["flair", "t2"])
    assert all(f.is_file() for f in files) and pp.subject_file(out, "coregistration", "t2") in files
    assert pp.subject_file(out, "coregistration", "flair") not in files  # the anchor is the reference
    coreg = json.loads(pp.subject_file(out, "coregistration_qc").read_text())
    assert list(coreg["modalities"]) == ["t2"] and coreg["modalities"]["t2"]["coregistered"]
    assert not pp.subject_file(out, "image", "t1").exists()
    table = pp.preprocessed_manifest(
        [{"subject": "f1", "folder": str(out), "modalities": ["flair", "t2"]}], ["t1", "t2", "flair"],
        tmp / "flair_only.tsv")
    row = pd.read_csv(table, sep="\t").iloc[0]
    assert pd.isna(row["t1"]) and row["flair"] == str(out / "grid" / "flair.nii.gz")
    with pytest.raises(InputError, match="f1 lacks"):  # without its modalities, T1 files are asked for
        pp.preprocessed_manifest([{"subject": "f1", "folder": str(out)}], ["t1", "flair"], tmp / "y.tsv")
