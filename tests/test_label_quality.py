"""Fidelity metrics of synthetic label maps against hand-computed cases."""

import numpy as np
import pandas as pd
import pytest

from brainsynth import feature_metrics as FM
from brainsynth.errors import InputError
from brainsynth.generators import label_quality as LQ
from brainsynth.labels import LabelSchema

SCHEMA = LabelSchema()
WM, GM, CSF = SCHEMA.value("wm"), SCHEMA.value("gm"), SCHEMA.value("csf")
WMH, OEDEMA = SCHEMA.value("wmh"), SCHEMA.value("oedema")


def brain(shape=(10, 10, 10)):
    lab = np.zeros(shape, np.uint8)
    lab[1:9, 1:9, 1:9] = WM
    lab[1:9, 1:9, 1] = GM
    lab[1:9, 1, 2:9] = CSF
    return lab


def test_dice_per_class_hand_case():
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 2, 2, 2, 0])
    d = LQ.dice_per_class(a, b, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 1 / 3)
    assert d[2] == pytest.approx(2 * 2 / 6)
    assert np.isnan(d[3])


def test_reconstruction_gate_flags_lesions_created_in_healthy_subjects():
    ref = brain()
    lesioned = brain()
    lesioned[4:6, 4:6, 4:6] = WMH
    rows = LQ.reconstruction_rows(ref, ref, SCHEMA.names, "healthy_ok", "held_out")
    rows += LQ.reconstruction_rows(lesioned, lesioned, SCHEMA.names, "lesioned", "held_out")
    gate = LQ.reconstruction_gate(rows, SCHEMA).set_index("class")
    assert gate["pass"].all()
    assert gate.loc["wmh", "dice_mean"] == 1.0 and gate.loc["wmh", "n_subjects_with_class"] == 1
    assert gate.loc["wmh", "n_healthy_subjects"] == 1

    bad = brain()
    bad[2:4, 2:4, 2:4] = OEDEMA  # decoded tumour in a healthy subject
    rows += LQ.reconstruction_rows(ref, bad, SCHEMA.names, "healthy_bad", "held_out")
    gate = LQ.reconstruction_gate(rows, SCHEMA).set_index("class")
    assert gate.loc["oedema", "created_in_healthy"] == 8
    assert not gate.loc["oedema", "pass"]
    # WM lost 8 voxels in one of three subjects: Dice 2*(n-8)/(2n-8)
    n = int((ref == WM).sum())
    assert gate.loc["wm", "dice_min"] == pytest.approx(2 * (n - 8) / (2 * n - 8))


def test_reconstruction_gate_threshold():
    ref = brain()
    rec = ref.copy()
    rec[rec == CSF] = GM  # CSF lost entirely
    gate = LQ.reconstruction_gate(LQ.reconstruction_rows(ref, rec, SCHEMA.names, "s", "held_out"),
                                  SCHEMA).set_index("class")
    assert gate.loc["csf", "dice_mean"] == 0.0 and not gate.loc["csf", "pass"]
    assert gate.loc["csf", "volume_ratio"] == 0.0


def test_conditioning_adherence_and_spearman():
    cond = pd.DataFrame({"mode": ["healthy"] * 4 + ["tumour"] * 4,
                         "dc_wmh": [0.0] * 8, "dc_tumour": [0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4]})
    vols = pd.DataFrame({"sample": range(8), "voxels_wmh": [0, 0, 9, 0, 0, 0, 0, 0],
                         "voxels_tumour": [0, 3, 0, 0, 2, 20, 30, 40]})
    summary, per = LQ.conditioning_adherence(vols, cond, min_voxels=5)
    s = summary.set_index(["mode", "measure", "lesion_type"])["value"]
    assert s[("healthy", "any_lesion", "all")] == 0.25          # sample 2 (9 WMH voxels); 3 voxels is noise
    assert s[("tumour", "requested_present", "tumour")] == 0.75  # sample 4 has 2 voxels only
    assert s[("tumour", "unrequested_absent", "all")] == 1.0
    assert s[("all_requested", "spearman", "tumour")] == pytest.approx(1.0)
    assert np.isnan(s[("all_requested", "spearman", "wmh")])     # never requested
    assert list(per["requested_present"]) == [True] * 4 + [False, True, True, True]


def test_lesion_volume_ratios_hand_case():
    per = pd.DataFrame({"mode": ["wmh_only"] * 3 + ["tumour_only"] * 2 + ["healthy"],
                        "voxels_wmh": [10, 30, 50, 0, 0, 400], "voxels_tumour": [0, 0, 0, 600, 1000, 0]})
    training = pd.DataFrame({"voxels_wmh": [0, 10, 20, 0, 40], "voxels_tumour": [0, 0, 0, 400, 0]})
    r = LQ.lesion_volume_ratios(per, training, ["wmh", "tumour"])
    assert r["wmh"] == (pytest.approx(30 / 20), 3, 3)        # medians 30 (samples) and 20 (maps holding WMH)
    assert r["tumour"] == (pytest.approx(800 / 400), 2, 1)
    assert np.isnan(LQ.lesion_volume_ratios(per, training.assign(voxels_wmh=0), ["wmh"])["wmh"][0])


def test_spearman_hand_case():
    assert LQ.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert LQ.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_pairwise_dice_identical_and_disjoint():
    a = brain()
    mean, std, n = LQ.pairwise_dice([a, a, a], SCHEMA.n_classes)
    assert (mean, std, n) == (1.0, 0.0, 3)
    b = a.copy()
    b[a == WM] = GM
    b[a == GM] = WM
    mean, _, n = LQ.pairwise_dice([a, b], SCHEMA.n_classes)
    # CSF identical (1), GM and WM swapped (0 each)
    assert n == 1 and mean == pytest.approx(1 / 3)


def test_mean_label_dice_is_the_mean_of_the_per_class_dice():
    """One joint histogram gives what dice_per_class gives class by class: the mean over the
    non-background classes either map holds (values beyond the classes count as background),
    1 for two maps without any; maps of two shapes are refused."""
    rng = np.random.default_rng(1)
    for n_classes in (2, 5, 10):
        a = rng.integers(0, n_classes + 2, size=(6, 7, 5))     # a few values beyond the classes
        b = rng.integers(0, n_classes, size=(6, 7, 5))
        a[a == 1] = 0                                           # a class only one map holds
        per_class = [v for v in LQ.dice_per_class(a, b, range(1, n_classes)).values() if np.isfinite(v)]
        assert LQ.mean_label_dice(a, b, n_classes) == float(np.mean(per_class))
    empty = np.zeros((3, 3, 3), np.uint8)
    assert LQ.mean_label_dice(empty, empty, 10) == 1.0
    with pytest.raises(InputError, match="cannot be compared"):
        LQ.mean_label_dice(empty, np.zeros((3, 3, 2), np.uint8), 10)


def test_pairwise_dice_compared_like_for_like():
    """Pooled over phenotypes the pairwise Dice falls with the mix; per mode it does not."""
    a, b = brain(), brain()
    b[8, 1:9, 1:9] = CSF                        # a second brain: one more CSF face
    tumour = a.copy()
    tumour[4:6, 4:6, 4:6] = OEDEMA
    # training: two different healthy brains, two tumour maps; samples: two identical healthy
    # brains, two identical tumour maps, one unseen map (no training map of its kind)
    training, phenotypes = [a, b, tumour, tumour], ["healthy", "healthy", "tumour_only", "tumour_only"]
    samples, modes = [a, a, tumour, tumour, tumour], ["healthy", "healthy", "tumour_only", "tumour_only", "unseen"]
    like = LQ.pairwise_dice_by_phenotype(samples, modes, training, phenotypes, SCHEMA.n_classes).set_index("mode")
    assert list(like.index) == ["healthy", "tumour_only"]
    ab = LQ.mean_label_dice(a, b, SCHEMA.n_classes)
    assert like.loc["healthy", "training"] == pytest.approx(ab) and ab < 0.98
    assert like.loc["healthy", "synthetic"] == 1.0 and like.loc["healthy", "target"] == pytest.approx(ab + 0.02)
    assert not like.loc["healthy", "pass"]      # identical samples: less diverse than the training maps
    assert like.loc["tumour_only", "pass"]      # as alike as the training maps of the phenotype
    assert (like["n_synthetic_pairs"] == 1).all() and (like["n_training_pairs"] == 1).all()
    # pooled, the identical healthy samples hide behind the healthy / tumour pairs
    pooled, _, _ = LQ.pairwise_dice(samples[:4], SCHEMA.n_classes)
    assert pooled < like.loc["healthy", "training"]


def test_lesion_centroid_spread_in_mm():
    maps = []
    for x in (2, 6):
        lab = brain()
        lab[x, 5, 5] = WMH
        maps.append(lab)
    spread = LQ.lesion_centroid_spread(maps, SCHEMA, voxel_mm=4.0)
    assert spread["wmh"]["n_with_lesion"] == 2
    assert spread["wmh"]["centroid_spread_mm"] == pytest.approx(8.0)   # each 2 voxels x 4 mm from the mean
    assert np.isnan(spread["tumour"]["centroid_spread_mm"])


def test_tissue_fraction_check_tolerance():
    tr = pd.DataFrame({"csf": [0.10, 0.12], "gm": [0.4, 0.4]})
    syn = pd.DataFrame({"csf": [0.05, 0.05], "gm": [0.44, 0.44]})
    chk = LQ.tissue_fraction_check(syn, tr, ["csf", "gm"], tolerance=0.15).set_index("tissue")
    assert chk.loc["csf", "relative_difference"] == pytest.approx(-0.06 / 0.11)
    assert not chk.loc["csf", "pass"] and chk.loc["gm", "pass"]


def test_lesion_phenotypes_name_maps_as_the_audit_names_its_modes():
    vols = pd.DataFrame({"voxels_wmh": [0, 9, 0, 9, 5], "voxels_tumour": [3, 0, 40, 40, 0]})
    assert list(LQ.lesion_phenotypes(vols, ["wmh", "tumour"])) == [
        "healthy", "wmh_only", "tumour_only", "unseen", "healthy"]  # 3 and 5 voxels: not more than 5
    three = vols.assign(voxels_x=0)
    assert LQ.lesion_phenotypes(three, ["wmh", "tumour", "x"])[3] == "wmh+tumour"


def test_tissue_fractions_compared_like_for_like():
    # training: healthy maps with csf 0.10, tumour maps 0.06 (the tumour takes its share)
    tr = pd.DataFrame({"csf": [0.10, 0.10, 0.06, 0.06]})
    tr_ph = ["healthy", "healthy", "tumour_only", "tumour_only"]
    # samples: 2 healthy at 0.10, 1 tumour at 0.06, 1 unseen at 0.02 (no training map of its kind)
    syn = pd.DataFrame({"csf": [0.10, 0.10, 0.06, 0.02]})
    modes = ["healthy", "healthy", "tumour_only", "unseen"]
    chk = LQ.tissue_fraction_check_by_phenotype(syn, modes, tr, tr_ph, ["csf"]).set_index("tissue")
    # training mean weighted 2:1 as the matched samples: (2 x 0.10 + 0.06) / 3 = synthetic (0.26 / 3)
    assert chk.loc["csf", "training_mean"] == pytest.approx(0.26 / 3)
    assert chk.loc["csf", "relative_difference"] == pytest.approx(0.0, abs=1e-12)
    assert chk.loc["csf", "pass"] and chk.loc["csf", "modes"] == "healthy,tumour_only"
    assert chk.loc["csf", "n_synthetic"] == 3
    # the plain comparison counts the unseen sample's extra lesion as missing csf: 0.07 vs 0.08
    plain = LQ.tissue_fraction_check(syn, tr, ["csf"]).set_index("tissue")
    assert plain.loc["csf", "relative_difference"] == pytest.approx(-0.125)
    # a real shortfall still fails: healthy samples at 0.08 against healthy maps at 0.10
    short = LQ.tissue_fraction_check_by_phenotype(pd.DataFrame({"csf": [0.08, 0.08]}), ["healthy"] * 2, tr, tr_ph,
                                                  ["csf"], tolerance=0.15).set_index("tissue")
    assert short.loc["csf", "relative_difference"] == pytest.approx(-0.2) and not short.loc["csf", "pass"]
    # no mode with training maps of its phenotype: nothing to compare, not passed
    none = LQ.tissue_fraction_check_by_phenotype(syn.iloc[3:], ["unseen"], tr, tr_ph, ["csf"])
    assert np.isnan(none.loc[0, "relative_difference"]) and not none.loc[0, "pass"] and none.loc[0, "modes"] == ""


def test_sample_flags_catch_tumour_asked_healthy_and_tissue_outliers():
    cond = pd.DataFrame({"mode": ["healthy", "healthy", "tumour"], "dc_wmh": [0.0, 0.0, 0.0],
                         "dc_tumour": [0.0, 0.0, 0.3]})
    vols = pd.DataFrame({"sample": ["s1", "s2", "s3"], "voxels_wmh": [0, 0, 0], "voxels_tumour": [0, 200, 150]})
    _, per = LQ.conditioning_adherence(vols, cond)
    per["sample"] = vols["sample"]
    training = pd.DataFrame({"csf": [0.08, 0.10], "gm": [0.40, 0.44]})
    fractions = pd.DataFrame({"csf": [0.09, 0.09, 0.30], "gm": [0.42, 0.42, 0.42]})
    mem = pd.DataFrame({"synthetic": ["s1", "s2", "s3"], "closer_than_held_out": [True, False, False]})
    flags = LQ.sample_flags(per, fractions, training, mem, ["csf", "gm"]).set_index("sample")
    assert list(flags["missed_conditioning"]) == [False, True, False]
    assert list(flags["tissue_out_of_range"]) == [False, False, True]
    assert flags.loc["s3", "tissues_out_of_range"] == "csf"
    assert list(flags["near_copy"]) == [True, False, False]
    assert flags["flagged"].all()
    assert not flags["lesion_out_of_range"].any()               # no training volumes given: not checked
    # training tumours of 100-200 voxels: range widened by a quarter of its width, 75-225
    vols = pd.DataFrame({"voxels_wmh": [0, 0, 0], "voxels_tumour": [0, 100, 200]})
    for tumour, out in ((150, False), (225, False), (226, True), (74, True), (3, False)):  # 3: absent, missed
        per.loc[2, ["voxels_tumour", "present_tumour"]] = tumour, tumour > 5
        flags = LQ.sample_flags(per, fractions, training, mem, ["csf", "gm"], training_volumes=vols)
        assert list(flags["lesion_out_of_range"]) == [False, False, out], tumour
        assert flags.loc[2, "lesions_out_of_range"] == ("tumour" if out else "")
    # an unrequested lesion is missed conditioning, not a size outlier (s2: 200 tumour voxels asked healthy)
    per.loc[1, "voxels_tumour"] = 5000
    assert not LQ.sample_flags(per, fractions, training, mem, ["csf", "gm"], training_volumes=vols).loc[
        1, "lesion_out_of_range"]


def test_cohens_d_hand_case():
    # means 3 and 1, both variances 1 (ddof 1) -> pooled sd 1 -> d = 2
    assert LQ.cohens_d([2, 3, 4], [0, 1, 2]) == pytest.approx(2.0)
    assert np.isnan(LQ.cohens_d([1, 1], [1, 1])) and np.isnan(LQ.cohens_d([1], [1, 2]))
    tr = pd.DataFrame({"csf": [0.0, 1.0, 2.0]})
    chk = LQ.tissue_fraction_check(pd.DataFrame({"csf": [2.0, 3.0, 4.0]}), tr, ["csf"])
    assert chk.loc[0, "cohens_d"] == pytest.approx(2.0)


def test_frechet_distance_hand_case():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert FM.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means 1 apart in each of 3 dims -> FID = |mu_a - mu_b|^2 = 3
    assert FM.frechet_distance(a, a + 1.0) == pytest.approx(3.0, abs=1e-6)


def test_knn_precision_recall_hand_case():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # k=1 radii of the real points: 1 each; 0.5 and 2.5 fall inside, 10 outside
    syn = np.array([[0.5], [2.5], [10.0], [10.2], [10.4]])
    p, r = FM.knn_precision_recall(real, syn, k=1)
    assert p == pytest.approx(2 / 5)
    # synthetic radii (k=1): 2.0, 2.0, 0.2, 0.2, 0.2 -> real 0..4 covered by the balls around 0.5 / 2.5
    assert r == pytest.approx(5 / 5)
    assert FM.knn_precision_recall(real, real, k=2) == (1.0, 1.0)


def test_against_reference_rows():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 3))
    rows = FM.against_reference(ref, {"same": ref, "far": ref + 10.0, "few": ref[:3], "one": ref[:1]}, k=3)
    by = {r["set"]: r for r in rows}
    assert by["same"]["fid"] == pytest.approx(0.0, abs=1e-6) and (by["same"]["precision"], by["same"]["recall"]) == (1, 1)
    assert by["far"]["fid"] == pytest.approx(300.0, rel=1e-6) and by["far"]["precision"] == 0 == by["far"]["recall"]
    assert by["few"]["n"] == 3 and np.isnan(by["few"]["precision"])  # k-NN needs more than k points
    assert np.isnan(by["one"]["fid"]) and by["few"]["fid"] > 0  # a Gaussian fit needs 2 points
