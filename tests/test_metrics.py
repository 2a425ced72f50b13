import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from brainsynth.errors import InputError
from brainsynth.io import save_table
from brainsynth.labels import LabelSchema
from brainsynth.metrics import (
    FP_TUM_CLASS,
    LONG_COLUMNS,
    MISSING,
    binary_scores,
    class_groups,
    fp_tumour,
    hd95,
    read_long,
    score_cohort,
    score_subject,
)

torch.set_num_threads(1)
nan = float("nan")


# --------------------------------------------------------------- hand cases

def mask(shape, *idx):
    m = np.zeros(shape, bool)
    for i in idx:
        m[i] = True
    return m


def test_both_empty_is_perfect():
    z = np.zeros((4, 4), bool)
    s = binary_scores(z, z)
    assert s["dice"] == s["precision"] == s["recall"] == s["accuracy"] == 1.0
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (0, 0, 0, 16)


def test_both_empty_nnunet_convention():
    z = np.zeros((4, 4), bool)
    s = binary_scores(z, z, empty_score=nan)
    assert math.isnan(s["dice"]) and math.isnan(s["precision"]) and math.isnan(s["recall"])
    assert s["accuracy"] == 1.0


def test_empty_prediction():
    t = mask((4, 4), (0, 0), (0, 1))
    s = binary_scores(np.zeros_like(t), t)
    assert s["dice"] == 0.0 and s["recall"] == 0.0 and math.isnan(s["precision"])
    assert s["accuracy"] == pytest.approx(14 / 16)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (0, 0, 2, 14)


def test_empty_truth():
    p = mask((4, 4), (3, 3))
    s = binary_scores(p, np.zeros_like(p))
    assert s["dice"] == 0.0 and s["precision"] == 0.0 and math.isnan(s["recall"])
    assert s["accuracy"] == pytest.approx(15 / 16)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (0, 1, 0, 15)


def test_perfect_overlap():
    t = mask((5, 5, 5), (slice(1, 3), slice(1, 4), 2))
    s = binary_scores(t.copy(), t)
    assert s["dice"] == s["precision"] == s["recall"] == s["accuracy"] == 1.0
    assert s["tp"] == 6 and s["fp"] == s["fn"] == 0


def test_partial_overlap_exact():
    # 10 voxels in a row: truth = 0..5 (6), pred = 3..8 (6); tp=3 fp=3 fn=3 tn=1
    t = np.zeros(10, bool)
    t[0:6] = True
    p = np.zeros(10, bool)
    p[3:9] = True
    s = binary_scores(p, t)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (3, 3, 3, 1)
    assert s["dice"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(0.4)
    # asymmetric: pred = 4..5 inside truth -> precision 1, recall 2/6, dice 4/8
    p = np.zeros(10, bool)
    p[4:6] = True
    s = binary_scores(p, t)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(1 / 3)
    assert s["dice"] == pytest.approx(0.5) and s["accuracy"] == pytest.approx(0.6)


def test_non_boolean_inputs_and_shape_mismatch():
    s = binary_scores(np.array([0, 2, 3]), np.array([0, 1, 0]))
    assert s["tp"] == 1 and s["fp"] == 1
    with pytest.raises(InputError, match="shape"):
        binary_scores(np.zeros(3), np.zeros(4))


# --------------------------------------------------------------- MONAI agreement

def _t(m):
    return torch.from_numpy(m[None, None].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_agrees_with_monai(seed):
    from monai.metrics import ConfusionMatrixMetric, DiceMetric

    rng = np.random.default_rng(seed)
    shape = (12, 11, 10)
    truth = rng.random(shape) < rng.uniform(0.05, 0.5)
    pred = rng.random(shape) < rng.uniform(0.05, 0.5)
    s = binary_scores(pred, truth)
    dm = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dm(_t(pred), _t(truth))
    cm = ConfusionMatrixMetric(include_background=True,
                               metric_name=["precision", "sensitivity", "accuracy"],
                               reduction="none", compute_sample=True)
    cm(_t(pred), _t(truth))
    prec, sens, acc = (float(x.reshape(-1)[0]) for x in cm.aggregate())
    assert s["dice"] == pytest.approx(float(dm.aggregate().reshape(-1)[0]), abs=1e-6)
    assert s["precision"] == pytest.approx(prec, abs=1e-6)
    assert s["recall"] == pytest.approx(sens, abs=1e-6)
    assert s["accuracy"] == pytest.approx(acc, abs=1e-6)


def test_empty_cases_match_monai_dice_ignore_empty_false():
    from monai.metrics import DiceMetric

    z = np.zeros((3, 3, 3), bool)
    o = z.copy()
    o[1, 1, 1] = True
    for p, t in [(z, z), (z, o), (o, z)]:
        dm = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        dm(_t(p), _t(t))
        assert binary_scores(p, t)["dice"] == float(dm.aggregate().reshape(-1)[0])


# --------------------------------------------------------------- hd95

def test_hd95_offset_cubes():
    truth = np.zeros((20, 12, 12), bool)
    truth[4:10, 3:9, 3:9] = True
    pred = np.roll(truth, 3, axis=0)  # 3 voxels along axis 0
    assert hd95(pred, truth) == pytest.approx(3.0)
    assert hd95(pred, truth, spacing=(2.0, 1.0, 0.5)) == pytest.approx(6.0)
    assert hd95(truth, truth) == pytest.approx(0.0)
    # isotropic scalar spacing
    assert hd95(pred, truth, spacing=1.5) == pytest.approx(4.5)


def test_hd95_empty_is_nan():
    z = np.zeros((6, 6, 6), bool)
    o = z.copy()
    o[2:4, 2:4, 2:4] = True
    assert math.isnan(hd95(z, o)) and math.isnan(hd95(o, z)) and math.isnan(hd95(z, z))


# --------------------------------------------------------------- fp_tum

def test_fp_tumour_hand_case():
    # truth: 4 tumour voxels (values 7, 8, 9, 9); pred labels 2 of them WMH (6)
    truth = np.array([0, 3, 7, 8, 9, 9, 6])
    pred = np.array([0, 6, 6, 8, 6, 0, 6])
    assert fp_tumour(pred, truth, wmh_value=6, tumour_values=[7, 8, 9]) == pytest.approx(0.5)
    assert fp_tumour(pred, truth, 6, 9) == pytest.approx(0.5)
    assert math.isnan(fp_tumour(pred, np.zeros(7, int), 6, [7, 8, 9]))
    assert fp_tumour(np.zeros(7, int), truth, 6, [7, 8, 9]) == 0.0


# --------------------------------------------------------------- subject / cohort

SCHEMA = LabelSchema()


def _labels():
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[:4] = 3            # wm
    truth[4:] = 2            # gm
    truth[1:3, 1:3, 1:3] = 6  # wmh
    truth[5:7, 5:7, 5:7] = 8  # oedema
    truth[6, 6, 6] = 9        # enhancing
    pred = truth.copy()
    pred[5, 5, 5] = 6         # one tumour voxel labelled WMH (of 8)
    return pred, truth


def test_class_groups_from_schema():
    g = class_groups(SCHEMA, names=["wm", "wmh"])
    assert g == {"wm": [3], "wmh": [6], "tumour": [7, 8, 9]}
    assert "background" not in class_groups(SCHEMA)


def test_score_subject_rows():
    pred, truth = _labels()
    classes = {"wmh": 6, "tumour": [7, 8, 9]}
    rows = score_subject(pred, truth, classes, spacing=(1, 1, 1), with_hd95=True,
                         fp_tum={"wmh": 6, "tumour": [7, 8, 9]})
    df = pd.DataFrame(rows).set_index(["class", "metric"])["value"]
    assert df[("tumour", "recall")] == pytest.approx(7 / 8)
    assert df[("tumour", "precision")] == 1.0
    assert df[("tumour", "dice")] == pytest.approx(14 / 15)
    assert df[("wmh", "precision")] == pytest.approx(8 / 9)
    assert df[("wmh", "truth_voxels")] == 8 and df[("wmh", "pred_voxels")] == 9
    assert df[(FP_TUM_CLASS, "fp_tum")] == pytest.approx(1 / 8)
    assert ("wmh", "hd95") in df.index
    assert not any(r["metric"] == "hd95" for r in score_subject(pred, truth, classes))


def test_score_cohort_long_format_and_roundtrip(tmp_path):
    pred, truth = _labels()
    pairs = [
        ("001", pred, truth),
        {"subject": "002", "pred": truth, "truth": truth, "test_set": "other", "seed": 3},
    ]
    df = score_cohort(pairs, {"wmh": 6, "tumour": [7, 8, 9]}, fp_tum=(6, [7, 8, 9]),
                      experiment="exp1", arm="real", task="wmh")
    assert list(df.columns[:4]) == LONG_COLUMNS[:4]
    assert list(df.columns[-4:]) == LONG_COLUMNS[-4:]
    assert "seed" in df.columns
    assert set(df["test_set"]) == {MISSING, "other"}
    assert df["value"].dtype == float
    per_subject = df.groupby("subject").size()
    assert per_subject["001"] == per_subject["002"] == 2 * 6 + 1
    v = df.set_index(["subject", "class", "metric"])["value"]
    assert v[("002", "wmh", "dice")] == 1.0 and v[("002", "tumour", "fp_tum")] == 0.0
    path = save_table(df, tmp_path / "scores.tsv")
    back = read_long(path)
    assert list(back["subject"].unique()) == ["001", "002"]
    pd.testing.assert_series_equal(back["value"], df["value"])


def test_score_cohort_nifti_paths_use_truth_spacing(tmp_path):
    from brainsynth.io import save_nifti

    truth = np.zeros((20, 12, 12), np.uint8)
    truth[4:10, 3:9, 3:9] = 6
    pred = np.roll(truth, 3, axis=0)
    aff = np.diag([2.0, 1.0, 1.0, 1.0])
    tp = save_nifti(truth, aff, tmp_path / "t.nii.gz")
    pp = save_nifti(pred, aff, tmp_path / "p.nii.gz")
    df = score_cohort([("s1", pp, tp)], {"wmh": 6}, with_hd95=True, arm="a")
    v = df.set_index("metric")["value"]
    assert v["hd95"] == pytest.approx(6.0)
    assert v["dice"] == pytest.approx(0.5)


def test_score_cohort_shape_error_names_subject():
    with pytest.raises(InputError, match="s9"):
        score_cohort([("s9", np.zeros((2, 2)), np.zeros((3, 3)))], {"wmh": 6})
