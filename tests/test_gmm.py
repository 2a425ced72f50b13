"""The gmm generator (SynthSeg's generative model): intensities follow their drawn parameters,
the sample contract, determinism, and the recipe key that selects it."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth import experiment as design
from brainsynth.errors import InputError
from brainsynth.generators.gmm import GMMParameters, draw_parameters, gmm_image, synthesize_gmm

NONE = {"bias_coeff": 0.0, "blur_sigma": 0.0, "noise_std": 0.0, "bias_seed": 0}


def _label():
    label = np.zeros((20, 20, 10), dtype=np.int16)
    label[2:18, 2:18, 2:8] = 1
    label[5:15, 5:15, 3:7] = 2
    label[8:12, 8:12, 4:6] = 3
    return label


def test_constant_classes_scale_to_the_percentile_range():
    # means 0.2 / 0.5 / 0.8, no spread: the 1st and 99th brain percentiles are 0.2 and 0.8,
    # so the classes land on 0, 0.5 and 1; the background stays 0
    label = _label()
    drawn = {"classes": {1: (0.2, 0.0), 2: (0.5, 0.0), 3: (0.8, 0.0)}, **NONE}
    img = gmm_image(label, drawn, GMMParameters(), np.random.default_rng(0))
    for c, expected in ((1, 0.0), (2, 0.5), (3, 1.0)):
        assert np.allclose(img[label == c], expected, atol=1e-6)
    assert not img[label == 0].any()


def test_class_spread_follows_its_standard_deviation():
    label = np.ones((40, 40, 40), dtype=np.int16)
    label[:, :, 20:] = 2
    drawn = {"classes": {1: (0.3, 0.02), 2: (0.7, 0.05)}, **NONE}
    img = gmm_image(label, drawn, GMMParameters(), np.random.default_rng(1))
    # scaling maps the 1st..99th percentile to [0, 1]: the ratio of the spreads and the order of
    # the means survive it
    s1, s2 = img[label == 1].std(), img[label == 2].std()
    assert s2 / s1 == pytest.approx(2.5, rel=0.1)
    assert img[label == 1].mean() < img[label == 2].mean()


def test_bias_field_and_noise_change_a_constant_class():
    label = np.ones((24, 24, 24), dtype=np.int16)
    label[0] = 2  # a second class so the scaling has a range
    base = {"classes": {1: (0.5, 0.0), 2: (0.9, 0.0)}, **NONE}
    flat = gmm_image(label, base, GMMParameters(), np.random.default_rng(0))
    assert flat[label == 1].std() == 0
    biased = gmm_image(label, {**base, "bias_coeff": 0.3, "bias_seed": 4}, GMMParameters(), np.random.default_rng(0))
    inner = biased[4:20, 4:20, 4:20]
    assert inner.std() > 0.01
    # smooth: neighbours differ far less than the field varies
    assert np.abs(np.diff(inner, axis=0)).mean() < 0.2 * inner.std()
    other = gmm_image(label, {**base, "bias_coeff": 0.3, "bias_seed": 5}, GMMParameters(), np.random.default_rng(0))
    assert not np.allclose(other, biased)  # the field's shape follows its seed
    noisy = gmm_image(label, {**base, "noise_std": 0.05}, GMMParameters(), np.random.default_rng(0))
    assert np.abs(np.diff(noisy[4:20, 4:20, 4:20], axis=0)).mean() > 0.01


def test_drawn_parameters_stay_in_their_ranges_and_repeat_with_the_seed():
    params = GMMParameters(mean_range=(0.1, 0.4), std_range=(0.01, 0.02))
    a = draw_parameters([0, 1, 2, 5], ["t1", "flair"], params, np.random.default_rng(3))
    b = draw_parameters([0, 1, 2, 5], ["t1", "flair"], params, np.random.default_rng(3))
    assert a == b and set(a["t1"]["classes"]) == {1, 2, 5}  # background is not drawn
    for m in a:
        for mean, std in a[m]["classes"].values():
            assert 0.1 <= mean <= 0.4 and 0.01 <= std <= 0.02
        assert 0 <= a[m]["bias_coeff"] <= 0.3 and 0 <= a[m]["blur_sigma"] <= 1
    assert a["t1"]["classes"] != a["flair"]["classes"]  # each modality its own contrast


def test_synthesize_writes_the_sample_contract_deterministically(tmp_path):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    paths = {}
    for i, sid in enumerate(["synth0001", "synth0002"]):
        paths[sid] = tmp_path / "in" / sid / "label.nii.gz"
        paths[sid].parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.roll(_label(), i, axis=0).astype(np.uint8), affine), paths[sid])
    kwargs = dict(label_paths=paths, modalities=["t1", "flair"], params=GMMParameters(), montage=False)
    manifest = synthesize_gmm(out_dir=tmp_path / "a", seed=5, **kwargs)
    synthesize_gmm(out_dir=tmp_path / "b", seed=5, **kwargs)
    synthesize_gmm(out_dir=tmp_path / "c", seed=6, **kwargs)
    assert list(manifest["subject"]) == ["synth0001", "synth0002"]
    assert {"mean_t1_1", "mean_flair_3", "generator", "seed"} <= set(manifest.columns)
    written = pd.read_csv(tmp_path / "a" / "manifest.tsv", sep="\t", keep_default_na=False)
    assert list(written.columns) == list(manifest.columns)
    assert np.allclose(written.filter(like="mean_"), manifest.filter(like="mean_"))
    for sid, path in paths.items():
        label = nib.load(path).get_fdata()
        out = tmp_path / "a" / "samples" / sid
        assert np.array_equal(nib.load(out / "label.nii.gz").get_fdata(), label)
        assert np.array_equal(nib.load(out / "label.nii.gz").affine, affine)
        for m in ("t1", "flair"):
            img = nib.load(out / f"{m}.nii.gz").get_fdata()
            assert np.array_equal(img, nib.load(tmp_path / "b" / "samples" / sid / f"{m}.nii.gz").get_fdata())
            assert not np.array_equal(img, nib.load(tmp_path / "c" / "samples" / sid / f"{m}.nii.gz").get_fdata())
            assert img.min() >= 0 and img.max() <= 1 and not img[label == 0].any()


def test_missing_label_map_is_named(tmp_path):
    with pytest.raises(InputError, match="synth0009"):
        synthesize_gmm(label_paths={"synth0009": tmp_path / "synth0009" / "label.nii.gz"}, out_dir=tmp_path / "o",
                       modalities=["t1"], params=GMMParameters())


@pytest.mark.parametrize("cfg,field", [
    ({"mean_range": [0.5, 0.1]}, "gmm_generator.mean_range"),
    ({"std_range": [0.1]}, "gmm_generator.std_range"),
    ({"bias_field_degree": 0}, "gmm_generator.bias_field_degree"),
    ({"contrast": 1}, "gmm_generator.contrast"),
])
def test_bad_parameters_name_the_field(cfg, field):
    with pytest.raises(InputError) as err:
        GMMParameters.from_config(cfg)
    assert field in str(err.value)


def test_recipe_generator_key():
    assert design.generator({"synthetic": 1.0}) == "brainspade"
    assert design.generator({"synthetic": 1.0, "generator": "gmm"}) == "gmm"
    for recipe, words in (({"synthetic": 1.0, "generator": "vae"}, "not known"),
                          ({"real": 1.0, "generator": "gmm"}, "no synthetic case"),
                          ({"synthetic": 1.0, "generator": "gmm", "style_set": "far-ood"}, "style_set")):
        with pytest.raises(InputError, match=words) as err:
            design.generator(recipe, "Sg")
        assert "segmentation.recipes.Sg" in str(err.value)


def test_sample_contract_names_what_a_generator_left_out(tmp_path):
    from brainsynth.generators.contract import check_samples

    paths = {"synth0001": tmp_path / "in" / "label.nii.gz"}
    paths["synth0001"].parent.mkdir()
    nib.save(nib.Nifti1Image(_label().astype(np.uint8), np.eye(4)), paths["synth0001"])
    out = tmp_path / "out"
    synthesize_gmm(label_paths=paths, out_dir=out, modalities=["t1", "t2"], params=GMMParameters(), montage=False)
    check_samples(out, ["synth0001"], ["t1", "t2"], "gmm")
    with pytest.raises(InputError, match="synth0002") as err:
        check_samples(out, ["synth0001", "synth0002"], ["t1"], "gmm")
    assert "manifest" in str(err.value)
    (out / "samples" / "synth0001" / "t2.nii.gz").unlink()
    with pytest.raises(InputError, match="has no t2 image") as err:
        check_samples(out, ["synth0001"], ["t1", "t2"], "gmm")
    assert "synth0001/t2.nii.gz" in str(err.value) and "'gmm'" in str(err.value)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), out / "samples" / "synth0001" / "t2.nii.gz")
    with pytest.raises(InputError, match="grid"):
        check_samples(out, ["synth0001"], ["t2"], "gmm")
