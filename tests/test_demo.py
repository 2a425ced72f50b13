"""Demo cohort plan, synthetic subjects and the working-grid template."""

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from brainsynth import demo
from brainsynth import template as tpl
from brainsynth.errors import InputError
from brainsynth.labels import LabelSchema

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
SCHEMA = LabelSchema.from_config(CONFIG)
SEED = 1234

# Small and coarse: 4 mm native voxels keep each subject well under a second.
SMALL = {
    "native_voxel_mm": 4.0,
    "sites": {
        "site_a": {"role": "in_distribution", "n": 4, "n_test": 1, "noise": 0.02,
                   "voxel_scale": 1.0, "contrast_jitter": 0.05},
        "site_b": {"role": "far_ood", "n": 2, "n_test": 2, "noise": 0.05,
                   "voxel_scale": 1.1, "contrast_jitter": 0.2, "anisotropy": 1.2},
    },
    "lesions": {"tumour": 0.35, "wmh": 0.35, "both": 0.15},
}
OUT_KEYS = ("t1", "t2", "flair", "label", "brain_mask")


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


# ---------------------------------------------------------------- plan


def test_plan_config_counts_and_determinism():
    cfg = CONFIG["demo"]
    a = demo.plan_cohort(cfg, CONFIG["seed"])
    b = demo.plan_cohort(copy.deepcopy(cfg), CONFIG["seed"])
    assert list(a.columns) == ["subject", "site", "role", "split", "phenotype"]
    assert a.equals(b)
    assert len(a) == 46 == sum(s["n"] for s in cfg["sites"].values())
    assert a["subject"].is_unique and a["subject"].str.fullmatch(r"demo\d{3}").all()
    assert set(a["phenotype"]) <= set(demo.PHENOTYPES)
    for site, s in cfg["sites"].items():
        rows = a[a["site"] == site]
        assert len(rows) == s["n"]
        assert (rows["role"] == s["role"]).all()
        assert (rows["split"] == "test").sum() == s["n_test"]
        assert (rows["split"] == "train").sum() == s["n"] - s["n_test"]
        assert {"tumour", "wmh"} <= set(rows["phenotype"])
    train = a[a["split"] == "train"]
    assert set(train["site"]) == {"site_a"}
    assert (train["phenotype"] == "both").sum() >= 1
    # fractions: 28 train subjects at 0.3/0.3/0.1 -> 8 tumour, 8 wmh, 3 both, 9 healthy
    assert train["phenotype"].value_counts().to_dict() == {"tumour": 8, "wmh": 8, "both": 3, "healthy": 9}


def test_plan_depends_on_seed():
    cfg = CONFIG["demo"]
    plans = {tuple(demo.plan_cohort(cfg, s)[["split", "phenotype"]].itertuples(index=False))
             for s in range(5)}
    assert len(plans) > 1


def test_plan_small_groups_get_minimum_phenotypes():
    cfg = copy.deepcopy(SMALL)
    cfg["lesions"] = {"tumour": 0.01, "wmh": 0.01, "both": 0.01}  # all healthy unless forced
    p = demo.plan_cohort(cfg, SEED)
    tr = p[(p.site == "site_a") & (p.split == "train")]
    assert set(tr["phenotype"]) == {"tumour", "wmh", "both"}
    b = p[p.site == "site_b"]
    assert sorted(b["phenotype"]) == ["tumour", "wmh"]
    # a phenotype a site's fractions rule out is never forced in (a BraTS-like tumour-only site)
    cfg["sites"]["site_b"]["lesions"] = {"tumour": 1.0, "wmh": 0.0, "both": 0.0}
    cfg["lesions"] = {"tumour": 0.0, "wmh": 0.0, "both": 0.0}
    p = demo.plan_cohort(cfg, SEED)
    assert set(p.loc[p.site == "site_a", "phenotype"]) == {"healthy"}
    assert set(p.loc[p.site == "site_b", "phenotype"]) == {"tumour"}
    cfg["sites"]["site_b"]["lesions"] = {"tumour": 0.9, "wmh": 0.2}
    with pytest.raises(InputError, match="demo.sites.site_b.lesions"):
        demo.plan_cohort(cfg, SEED)


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c["sites"]["site_a"].update(n_test=5), "demo.sites.site_a.n_test"),
    (lambda c: c.update(lesions={"tumour": 0.6, "wmh": 0.5}), "demo.lesions"),
    (lambda c: c.update(lesions={"tumor": 0.1}), "demo.lesions"),
    (lambda c: c.update(n_subjects=99), "demo.n_subjects"),
    (lambda c: c["sites"]["site_a"].update(role="ood"), "demo.sites.site_a.role"),
    (lambda c: c["sites"]["site_a"].update(n=0), "demo.sites.site_a.n"),
    (lambda c: c["sites"]["site_a"].update(n_test=4), "demo.sites"),
    (lambda c: c["sites"]["site_b"].pop("noise"), "demo.sites.site_b"),
    (lambda c: c.update(native_voxel_mm=-1), "demo.native_voxel_mm"),
    (lambda c: c["sites"]["site_a"].update(skull_stripped="yes"), "demo.sites.site_a.skull_stripped"),
    (lambda c: c["sites"]["site_a"].update(own_grid=["t1"]), "demo.sites.site_a.own_grid"),
])
def test_plan_rejects_nonsense(mutate, field):
    cfg = copy.deepcopy(SMALL)
    mutate(cfg)
    with pytest.raises(InputError) as exc:
        demo.plan_cohort(cfg, SEED)
    assert exc.value.field == field


def test_site_table():
    t = demo.site_table(SMALL)
    assert list(t["site"]) == ["site_a", "site_b"]
    assert t.loc[1, "voxel_z_mm"] == pytest.approx(4.0 * 1.1 * 1.2)
    assert t["n_train"].tolist() == [3, 0]


# ---------------------------------------------------------------- subjects


def _synth(tmp, row, seed):
    out = {k: tmp / row["subject"] / f"{k}.nii.gz" for k in OUT_KEYS}
    info = demo.synthesize_subject(row, SMALL, SCHEMA, seed, out)
    return out, info


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    rows = {p: {"subject": f"s_{p}", "site": "site_a", "phenotype": p} for p in demo.PHENOTYPES}
    rows["ood"] = {"subject": "s_ood", "site": "site_b", "phenotype": "both"}
    res = {k: _synth(tmp / "a", r, SEED) for k, r in rows.items()}
    res["tumour_again"] = _synth(tmp / "b", rows["tumour"], SEED)
    res["tumour_seed2"] = _synth(tmp / "c", rows["tumour"], SEED + 1)
    return res


def test_subject_outputs_and_geometry(cohort):
    for key, (out, info) in cohort.items():
        ref = None
        for k in OUT_KEYS:
            arr, img = load(out[k])
            assert arr.shape == info["shape"], (key, k)
            assert np.allclose(img.affine, info["affine"])
            if ref is None:
                ref = img
            assert arr.shape == ref.shape and np.array_equal(img.affine, ref.affine)
            if k in ("label", "brain_mask"):
                assert arr.dtype == np.uint8
            else:
                assert arr.dtype == np.float32 and np.isfinite(arr).all()
        # oblique native space: the affine is not diagonal
        lin = info["affine"][:3, :3]
        assert np.abs(lin - np.diag(np.diag(lin))).max() > 1e-3
        label, _ = load(out["label"])
        mask, _ = load(out["brain_mask"])
        assert set(np.unique(label)) <= set(SCHEMA.values)
        assert np.array_equal(mask, (label > 0).astype(np.uint8))
        # brain well inside the field of view
        faces = [label[0], label[-1], label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1]]
        assert all(f.max() == 0 for f in faces)


def test_subject_voxel_size_per_site(cohort):
    a = np.linalg.norm(cohort["healthy"][1]["affine"][:3, :3], axis=0)
    b = np.linalg.norm(cohort["ood"][1]["affine"][:3, :3], axis=0)
    assert np.allclose(a, 4.0)
    assert np.allclose(b, [4.4, 4.4, 4.4 * 1.2])


def test_subject_lesions_by_phenotype(cohort):
    v = SCHEMA.value
    for key in ("healthy", "tumour", "wmh", "both", "ood"):
        out, info = cohort[key]
        label, _ = load(out["label"])
        present = set(np.unique(label).tolist())
        phen = "both" if key == "ood" else key
        has_tumour = phen in ("tumour", "both")
        has_wmh = phen in ("wmh", "both")
        for c in ("necrotic", "oedema", "enhancing"):
            assert (v(c) in present) == has_tumour, (key, c)
        assert (v("wmh") in present) == has_wmh, key
        for c in ("csf", "gm", "wm", "deep_gm", "brainstem"):
            assert v(c) in present, (key, c)
        counts = SCHEMA.lesion_counts(label)
        assert counts == info["lesion_voxels"]


def test_subject_tumour_contrast(cohort):
    """Necrotic core dark on T1 and bright on T2; oedema bright on FLAIR vs WM."""
    out, _ = cohort["tumour"]
    label, _ = load(out["label"])
    t1, t2, fl = (load(out[k])[0] for k in ("t1", "t2", "flair"))
    v = SCHEMA.value
    wm = label == v("wm")
    assert np.median(t1[label == v("necrotic")]) < 0.6 * np.median(t1[wm])
    assert np.median(t2[label == v("necrotic")]) > 1.5 * np.median(t2[wm])
    assert np.median(fl[label == v("oedema")]) > 1.3 * np.median(fl[wm])


def test_subject_has_skull_and_scalp(cohort):
    out, _ = cohort["healthy"]
    label, _ = load(out["label"])
    t1, _ = load(out["t1"])
    outside = label == 0
    wm_level = np.median(t1[label == SCHEMA.value("wm")])
    bright_out = (t1 > 0.7 * wm_level) & outside
    assert bright_out.sum() > 500          # scalp
    # a dark skull band separates brain from scalp: along a ray from the brain
    # centre outwards, T1 drops below 0.3 * WM before reaching bright scalp
    c = np.round(np.argwhere(label > 0).mean(0)).astype(int)
    ray = t1[c[0]:, c[1], c[2]]
    lab = label[c[0]:, c[1], c[2]]
    first_out = int(np.argmax(lab == 0))
    rest = ray[first_out:]
    dark = int(np.argmax(rest < 0.3 * wm_level))
    assert rest[dark] < 0.3 * wm_level and (rest[dark:] > 0.7 * wm_level).any()
    # air at the field-of-view border is only noise
    assert t1[0].mean() < 0.15 * wm_level


def test_subject_determinism(cohort):
    a, _ = cohort["tumour"]
    b, _ = cohort["tumour_again"]
    c, _ = cohort["tumour_seed2"]
    for k in OUT_KEYS:
        xa, ia = load(a[k])
        xb, ib = load(b[k])
        assert np.array_equal(xa, xb) and np.array_equal(ia.affine, ib.affine), k
    xa, ia = load(a["t1"])
    xc, ic = load(c["t1"])
    assert xa.shape != xc.shape or not np.array_equal(xa, xc)
    assert not np.allclose(ia.affine, ic.affine)


def test_site_delivered_skull_stripped_with_flair_on_its_own_grid(tmp_path, cohort):
    # a BraTS-like dataset: the same subject, delivered zero outside the brain, FLAIR resampled
    cfg = copy.deepcopy(SMALL)
    cfg["sites"]["site_a"].update(skull_stripped=True, own_grid=["flair"])
    row = {"subject": "s_tumour", "site": "site_a", "phenotype": "tumour"}
    out = {k: tmp_path / f"{k}.nii.gz" for k in OUT_KEYS}
    demo.synthesize_subject(row, cfg, SCHEMA, SEED, out)
    ref, _ = cohort["tumour"]
    t1, img = load(out["t1"])
    label, _ = load(out["label"])
    assert np.array_equal(label, load(ref["label"])[0])
    assert (t1[label == 0] == 0).all() and (t1[label > 0] > 0).mean() > 0.99
    assert np.array_equal(t1[label > 0], load(ref["t1"])[0][label > 0])   # the same brain, stripped
    flair, fimg = load(out["flair"])
    assert flair.shape == (56, 60, 54) and not np.allclose(fimg.affine, img.affine)
    t2, t2img = load(out["t2"])
    assert t2.shape == t1.shape and np.allclose(t2img.affine, img.affine)


def test_subject_rejects_bad_row(tmp_path):
    row = {"subject": "x", "site": "nowhere", "phenotype": "healthy"}
    with pytest.raises(InputError):
        demo.synthesize_subject(row, SMALL, SCHEMA, SEED, {"t1": tmp_path / "t1.nii.gz"})
    row = {"subject": "x", "site": "site_a", "phenotype": "zombie"}
    with pytest.raises(InputError):
        demo.synthesize_subject(row, SMALL, SCHEMA, SEED, {"t1": tmp_path / "t1.nii.gz"})
    assert not (tmp_path / "t1.nii.gz").exists()


# ---------------------------------------------------------------- template


@pytest.fixture(scope="module", params=[(CONFIG["grid"]["voxel_mm"], tuple(CONFIG["grid"]["shape"])),
                                        (6.0, (32, 38, 32))])
def template(request, tmp_path_factory):
    v, shape = request.param
    tmp = tmp_path_factory.mktemp("tpl")
    out = {"t1": tmp / "t1.nii.gz", "brain_mask": tmp / "brain_mask.nii.gz",
           "labels": tmp / "labels.nii.gz", "priors": tmp / "priors.nii.gz",
           "prior_gm": tmp / "prior_gm.nii.gz", "head": tmp / "head.nii.gz"}
    info = tpl.build_template(v, shape, out, SCHEMA)
    return v, shape, out, info


def test_template_outputs(template):
    v, shape, out, info = template
    t1, t1_img = load(out["t1"])
    mask, _ = load(out["brain_mask"])
    label, _ = load(out["labels"])
    priors, p_img = load(out["priors"])
    gm, _ = load(out["prior_gm"])
    head, _ = load(out["head"])
    assert t1.shape == mask.shape == label.shape == head.shape == shape
    assert priors.shape == shape + (3,)
    assert np.allclose(np.diag(t1_img.affine)[:3], v)
    assert np.array_equal(p_img.affine, t1_img.affine)
    assert t1.dtype == np.float32 and priors.dtype == np.float32
    assert mask.dtype == np.uint8 and label.dtype == np.uint8
    assert np.isfinite(t1).all() and np.isfinite(priors).all()
    assert priors.min() >= 0.0 and priors.max() <= 1.0 + 1e-6
    s = priors.sum(-1)
    assert s.max() <= 1.0 + 1e-5
    assert np.allclose(s[mask > 0], 1.0, atol=1e-5) and np.all(s[mask == 0] == 0)
    assert np.allclose(gm, priors[..., 1])
    assert np.array_equal(mask, (label > 0).astype(np.uint8))
    assert set(np.unique(label)) == {SCHEMA.value(c) for c in ("background", *SCHEMA.tissues)}
    # the brain fits with a margin: nothing on the border faces
    for arr in (mask, label):
        faces = [arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]]
        assert all(f.max() == 0 for f in faces)
    assert min(info["brain_margin_mm"]) >= v
    # head: scalp bright, skull dark, all inside the grid; CSF darker than WM
    lab_wm = np.median(t1[label == SCHEMA.value("wm")])
    assert (head == tpl.HEAD_CODES["scalp"]).sum() > 100
    scalp = np.median(t1[head == tpl.HEAD_CODES["scalp"]])
    skull = np.median(t1[head == tpl.HEAD_CODES["skull"]])
    assert scalp > 2.0 * skull
    if v <= 4.0:  # coarser grids blur the (thinned) layers together
        assert scalp > 0.6 * lab_wm and skull < 0.35 * lab_wm
    assert np.median(t1[label == SCHEMA.value("csf")]) < 0.6 * lab_wm
    border = np.concatenate([f.ravel() for f in (head[0], head[-1], head[:, 0], head[:, -1],
                                                 head[:, :, 0], head[:, :, -1])])
    assert border.max() == 0
    assert 0.0 < info["head_scale"] <= 1.0


def test_template_thins_head_on_tight_grid(template):
    v, shape, _, info = template
    if v == 6.0:
        assert info["head_scale"] < 1.0
    else:
        assert info["head_thickness_mm"]["skull"] > 0


def test_template_rejects_too_small_grid(tmp_path):
    with pytest.raises(InputError) as exc:
        tpl.build_template(4.0, (30, 30, 30), {"t1": tmp_path / "t1.nii.gz"})
    assert exc.value.field == "grid.shape"
    assert not (tmp_path / "t1.nii.gz").exists()


def test_saved_atlas_gives_the_same_subject(cohort, tmp_path):
    """The demo_atlas file holds the atlas exactly: a subject warped from it is the subject
    warped from the atlas built in-process, file for file."""
    path = tpl.save_atlas(tmp_path / "atlas.npz")
    read, built = tpl.load_atlas(str(path)), tpl.load_atlas()
    for k in ("affine", "label", "fractions", "sdist", "sdist_affine", "brain_lo", "brain_hi",
              "tumour_centres", "wmh_centres"):
        assert np.array_equal(getattr(read, k), getattr(built, k)), k
    assert not read.label.flags.writeable
    row = {"subject": "s_tumour", "site": "site_a", "phenotype": "tumour"}
    out = {k: tmp_path / "s" / f"{k}.nii.gz" for k in OUT_KEYS}
    demo.synthesize_subject(row, SMALL, SCHEMA, SEED, out, atlas=path)
    for k in OUT_KEYS:
        a, b = nib.load(str(out[k])), nib.load(str(cohort["tumour"][0][k]))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine), k
    np.savez(tmp_path / "bad.npz", label=built.label)
    with pytest.raises(InputError, match="atlas file lacks"):
        tpl.load_atlas(str(tmp_path / "bad.npz"))


def test_atlas_labels_and_fractions():
    atlas = tpl.load_atlas()
    assert atlas is tpl.load_atlas()  # cached
    assert not atlas.label.flags.writeable
    c = tpl.ATLAS_CODES
    counts = np.bincount(atlas.label.ravel(), minlength=10)
    for name in ("csf", "gm", "wm", "deep_gm", "brainstem"):
        assert counts[c[name]] > 5000, name
    assert counts[[c["wmh"], c["necrotic"], c["oedema"], c["enhancing"]]].sum() == 0
    fsum = atlas.fractions.astype(np.int32).sum(0)
    assert np.all(fsum[atlas.label > 0] == 255) and np.all(fsum[atlas.label == 0] == 0)
    # deep grey matter sits in the middle of the brain, brainstem below it
    xyz = lambda code: np.argwhere(atlas.label == code).mean(0) + atlas.affine[:3, 3]
    dg, bs = xyz(c["deep_gm"]), xyz(c["brainstem"])
    assert abs(dg[0]) < 5 and -25 < dg[1] < 10 and -5 < dg[2] < 20
    assert abs(bs[0]) < 5 and bs[2] < -15
