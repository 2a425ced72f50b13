"""The label-consistency table: a real-data segmenter's Dice on synthetic vs real images."""

import numpy as np
import pandas as pd
import pytest

from brainsynth.errors import InputError
from brainsynth.label_consistency import consistency_table
from brainsynth.metrics import score_cohort

CLASSES = {"csf": [1], "gm": [2], "tumour": [7, 8]}


def _scores(pairs, **meta):
    return score_cohort([{"subject": s, "pred": p, "truth": t, **meta} for s, p, t in pairs], CLASSES)


def test_gap_per_class_on_hand_computed_cases():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0] = 1            # csf: 16 voxels
    truth[1:3] = 2          # gm: 32 voxels
    truth[3, 0, :2] = 7     # tumour: 2 voxels
    perfect = truth.copy()
    half_gm = truth.copy()
    half_gm[2] = 0          # gm Dice 2*16/(16+32) = 2/3
    healthy = truth.copy()
    healthy[3, 0, :2] = 0   # no tumour in truth: scores 1 by convention, must not count
    real = _scores([("r1", perfect, truth), ("r2", perfect, truth)], test_set="in_distribution")
    real = pd.concat([real, _scores([("far", half_gm, truth)], test_set="far_ood")])
    syn = _scores([("s1", half_gm, truth), ("s2", perfect, truth), ("s3", healthy, healthy)], test_set="synthetic")
    t = consistency_table(syn, real, "tissue", "R", "in_distribution", max_gap=0.10).set_index("class")
    assert t.loc["csf", "synthetic_dice"] == pytest.approx(1.0) and t.loc["csf", "n_synthetic"] == 3
    assert t.loc["gm", "synthetic_dice"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert t.loc["gm", "real_dice"] == pytest.approx(1.0) and t.loc["gm", "n_real"] == 2  # far_ood left out
    assert t.loc["gm", "gap"] == pytest.approx(1 - 8 / 9) and not bool(t.loc["gm", "pass"])  # 0.11 > 0.10
    wider = consistency_table(syn, real, "tissue", "R", "in_distribution", max_gap=0.12).set_index("class")
    assert bool(wider.loc["gm", "pass"])
    assert t.loc["tumour", "n_synthetic"] == 2  # s3 holds no tumour
    # a segmenter that misses the synthetic tumours fails the target
    missed = truth.copy()
    missed[3, 0, :2] = 0
    syn2 = _scores([("s1", missed, truth), ("s2", missed, truth)], test_set="synthetic")
    t2 = consistency_table(syn2, real, "tissue", "R", "in_distribution").set_index("class")
    assert t2.loc["tumour", "synthetic_dice"] == 0 and t2.loc["tumour", "gap"] == pytest.approx(1.0)
    assert not bool(t2.loc["tumour", "pass"]) and bool(t2.loc["csf", "pass"])


def test_missing_real_test_set_is_named():
    truth = np.ones((2, 2, 2), np.uint8)
    real = _scores([("r1", truth, truth)], test_set="in_distribution")
    with pytest.raises(InputError, match="near_ood"):
        consistency_table(real, real, "tissue", "R", "near_ood")
