"""Lesion insertion into real healthy subjects: lesions grow where asked, at about the volume
asked, with the contrasts of their modality; samples follow the contract and repeat per seed."""

import nibabel as nib
import numpy as np
import pytest

from brainsynth.errors import InputError
from brainsynth.generators import lesion_insertion as li

CLASSES = {"background": 0, "csf": 1, "gm": 2, "wm": 3, "deep_gm": 4, "brainstem": 5,
           "wmh": 6, "necrotic": 7, "oedema": 8, "enhancing": 9}
LESION_TYPES = {"wmh": ["wmh"], "tumour": ["necrotic", "oedema", "enhancing"]}
TISSUE = {"t1": {1: 0.2, 2: 0.5, 3: 0.8, 4: 0.6}, "flair": {1: 0.1, 2: 0.7, 3: 0.55, 4: 0.65}}


def phantom(shift=0):
    """A spherical brain: GM shell, WM inside, a CSF ventricle and a deep-GM blob."""
    grid = np.indices((40, 40, 40)) - 20
    r = np.sqrt((grid ** 2).sum(0))
    label = np.zeros((40, 40, 40), np.int16)
    label[r < 18] = 2
    label[r < 15] = 3
    label[17 + shift:23 + shift, 14:26, 17:23] = 1
    label[np.sqrt(((grid - np.array([8, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 3] = 4
    return label


def images(label, rng):
    out = {}
    for m, values in TISSUE.items():
        img = np.zeros(label.shape, np.float32)
        for c, v in values.items():
            img[label == c] = v + 0.02 * rng.standard_normal(int((label == c).sum()))
        out[m] = img
    return out


def test_tumour_grows_inside_brain_tissue_with_its_parts_in_place():
    label = phantom()
    request = {"necrotic": 60, "enhancing": 90, "oedema": 300}
    out = li.insert_tumour(label, CLASSES, request, np.random.default_rng(0))
    core = np.isin(out, [7, 9])
    assert np.isin(label[core], [2, 3, 4]).all()  # never CSF or background
    assert np.isin(label[out == 8], [3, 4]).all()  # oedema in white matter / deep GM
    assert (out[~np.isin(out, [7, 8, 9])] == label[~np.isin(out, [7, 8, 9])]).all()
    for c, n in ((7, 60), (9, 90), (8, 300)):
        assert 0.8 * n <= (out == c).sum() <= n, (c, (out == c).sum())
    # the necrotic part is the inside of the core, the oedema outside it
    centre = np.argwhere(core).mean(0)
    dist = {c: np.linalg.norm(np.argwhere(out == c) - centre, axis=1).mean() for c in (7, 9, 8)}
    assert dist[7] < dist[9] < dist[8]


def test_wmh_stays_in_white_matter_near_the_ventricles():
    label = phantom()
    out = li.insert_wmh(label, CLASSES, 80, np.random.default_rng(1))
    wmh = out == 6
    assert 64 <= wmh.sum() <= 80 and (label[wmh] == 3).all()
    ventricle = np.argwhere(label == 1).mean(0)
    wm_dist = np.linalg.norm(np.argwhere(label == 3) - ventricle, axis=1).mean()
    assert np.linalg.norm(np.argwhere(wmh) - ventricle, axis=1).mean() < wm_dist  # periventricular


def test_lesion_contrasts_follow_the_modality_and_leave_the_rest():
    rng = np.random.default_rng(2)
    label = phantom()
    imgs = images(label, rng)
    lesions = li.insert_tumour(label, CLASSES, {"necrotic": 40, "enhancing": 60, "oedema": 200}, rng)
    lesions = li.insert_wmh(lesions, CLASSES, 40, rng)
    inserted = np.where(lesions >= 6, lesions, 0)
    out = {m: li.lesion_intensities(imgs[m], label, inserted, CLASSES, li.CONTRASTS[m], rng) for m in imgs}
    wm, gm = label == 3, label == 2
    for c in (6, 8):  # WMH and oedema: FLAIR-bright (above GM and WM), T1-dark
        assert out["flair"][lesions == c].mean() > max(out["flair"][gm].mean(), out["flair"][wm & (lesions == 3)].mean())
        assert out["t1"][lesions == c].mean() < out["t1"][wm & (lesions == 3)].mean()
    assert out["t1"][lesions == 7].mean() < out["t1"][lesions == 8].mean()  # necrotic core darkest in T1
    far = ~np.asarray(np.abs(np.stack(np.gradient((inserted > 0).astype(float)))).sum(0) > 0) & (inserted == 0)
    far &= np.asarray(li.gaussian_filter((inserted > 0).astype(np.float32), 0.7) == 0)
    assert np.array_equal(out["t1"][far], imgs["t1"][far])
    assert not out["t1"][label == 0].any() and out["flair"].max() <= 1
    # a soft border: brain voxels just outside the oedema move towards its (FLAIR-bright) intensity
    from scipy.ndimage import binary_dilation

    ring = binary_dilation(lesions == 8) & (inserted == 0) & (label == 3)
    assert ring.any() and (out["flair"][ring] - imgs["flair"][ring]).mean() > 0.02


def test_volumes_per_conditioning_mode():
    import pandas as pd

    volumes = pd.DataFrame([{"subject": "a", "wmh": 50, "necrotic": 0, "oedema": 0, "enhancing": 0},
                            {"subject": "b", "wmh": 0, "necrotic": 20, "oedema": 100, "enhancing": 30},
                            {"subject": "c", "wmh": 0, "necrotic": 0, "oedema": 0, "enhancing": 0}])
    unseen = li.draw_volumes("unseen", 5, volumes, LESION_TYPES, 0)
    assert all(v["wmh"] == 50 and v["oedema"] == 100 for v in unseen)
    assert all(sum(v.values()) == 0 for v in li.draw_volumes("healthy", 3, volumes, LESION_TYPES, 0))
    tumour = li.draw_volumes("tumour_only", 4, volumes, LESION_TYPES, 0)
    assert all(v["wmh"] == 0 and (v["necrotic"], v["oedema"], v["enhancing"]) == (20, 100, 30) for v in tumour)
    with pytest.raises(InputError, match="tumour_only"):
        li.draw_volumes("glioma_only", 2, volumes, LESION_TYPES, 0)
    random = li.draw_volumes("random", 20, volumes, LESION_TYPES, 0)
    # one training subject's phenotype each, the healthy one's included (brainSPADE's random too)
    assert all(not (v["wmh"] > 0 and v["oedema"] > 0) for v in random)
    assert {sum(v.values()) > 0 for v in random} == {True, False}
    assert random == li.draw_volumes("random", 20, volumes, LESION_TYPES, 0)
    with pytest.raises(InputError, match="synthesis.conditioning"):
        li.draw_volumes("explicit", 2, volumes, LESION_TYPES, 0)
    with pytest.raises(InputError, match="no training subject has a lesion"):
        li.draw_volumes("random", 2, volumes.iloc[2:], LESION_TYPES, 0)
    with pytest.raises(InputError, match="lesion_insertion.contrasts.flair"):
        li.check_contrasts({"flair": {"oedma": 1.5}}, ["t1", "flair"], ["wmh", "oedema"])
    with pytest.raises(InputError, match="lesion_insertion.contrasts.pd"):
        li.check_contrasts({"pd": {"wmh": 1.5}}, ["t1", "flair"], ["wmh", "oedema"])


def test_insert_lesions_uses_healthy_hosts_and_repeats_per_seed(tmp_path):
    rng = np.random.default_rng(3)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    hosts, training = {}, {}
    for name, shift in (("h1", 0), ("h2", 2), ("ill", 1)):
        label = phantom(shift)
        if name == "ill":
            label = li.insert_wmh(label, CLASSES, 40, rng)
            label = li.insert_tumour(label, CLASSES, {"necrotic": 20, "enhancing": 30, "oedema": 80}, rng)
        folder = tmp_path / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "label.nii.gz")
        hosts[name] = {"label": folder / "label.nii.gz"}
        for m, img in images(label, rng).items():
            nib.save(nib.Nifti1Image(img, affine), folder / f"{m}.nii.gz")
            hosts[name][m] = folder / f"{m}.nii.gz"
        training[name] = folder / "label.nii.gz"
    kwargs = dict(hosts=hosts, training_labels=training, subjects=["synth0001", "synth0002", "synth0003"],
                  modalities=["t1", "flair"], classes=CLASSES, lesion_types=LESION_TYPES, conditioning="unseen",
                  montage=False)
    manifest = li.insert_lesions(out_dir=tmp_path / "a", seed=1, **kwargs)
    li.insert_lesions(out_dir=tmp_path / "b", seed=1, **kwargs)
    assert set(manifest["host"]) <= {"h1", "h2"}  # never the subject that has lesions
    assert (manifest["inserted_wmh"] > 0).all() and (manifest["inserted_oedema"] > 0).all()
    assert (manifest["inserted_wmh"] <= manifest["requested_wmh"]).all()
    for sid, host in zip(manifest["subject"], manifest["host"]):
        a, b = tmp_path / "a" / "samples" / sid, tmp_path / "b" / "samples" / sid
        label = nib.load(a / "label.nii.gz").get_fdata()
        original = nib.load(hosts[host]["label"]).get_fdata()
        assert (label[label < 6] == original[label < 6]).all() and (original[label >= 6] >= 2).all()
        for m in ("t1", "flair"):
            assert np.array_equal(nib.load(a / f"{m}.nii.gz").get_fdata(), nib.load(b / f"{m}.nii.gz").get_fdata())
    with pytest.raises(InputError, match="no healthy training subject"):
        li.insert_lesions(out_dir=tmp_path / "c", seed=1, **{**kwargs, "hosts": {"ill": hosts["ill"]}})
