"""The label-consistency table: a real-data segmenter's Dice on synthetic vs real images."""

import numpy as np
import pandas as pd
import pytest

from brainsynth.errors import InputError
from brainsynth.label_consistency import consistency_table, requested_samples
from brainsynth.labels import LabelSchema
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


def test_lesion_classes_scored_on_requested_and_unasked_samples():
    """The real model finds the tumour a sample asked for (s1) and misses the speck a WMH-only
    sample holds unasked (s2): the pooled row averages both, the split rows say which is which."""
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0] = 1
    truth[3, 0, :2] = 7
    missed = truth.copy()
    missed[3, 0, :2] = 0
    manifest = pd.DataFrame({"subject": ["s1", "s2", "s3"], "dc_wmh": [0.0, 0.5, 0.0], "dc_tumour": [0.4, 0.0, 0.0]})
    lesion_types = LabelSchema().lesion_type_values  # what the rule hands over
    assert lesion_types == {"wmh": [6], "tumour": [7, 8, 9]}
    requested = requested_samples(manifest, CLASSES, lesion_types)
    assert requested == {"tumour": {"s1"}}  # csf and gm are no lesion classes
    assert requested_samples(manifest, {"wm": [3, 6]}, lesion_types) == {}  # a class mixing tissue and lesion
    assert requested_samples(manifest, {"lesion": [6, 7]}, lesion_types) == {"lesion": {"s1", "s2"}}
    real = _scores([("r1", truth, truth)], test_set="in_distribution")
    syn = _scores([("s1", truth, truth), ("s2", missed, truth), ("s3", missed, missed)], test_set="synthetic")
    t = consistency_table(syn, real, "tumour", "R", "in_distribution", requested=requested)
    assert list(t.loc[t["class"] == "csf", "subset"]) == ["all"]
    rows = t[t["class"] == "tumour"].set_index("subset")
    assert list(rows.index) == ["all", "requested", "unrequested"]
    assert rows.loc["all", "synthetic_dice"] == pytest.approx(0.5) and rows.loc["all", "n_synthetic"] == 2
    assert rows.loc["requested", "synthetic_dice"] == pytest.approx(1.0) and rows.loc["requested", "n_synthetic"] == 1
    assert bool(rows.loc["requested", "pass"]) and not bool(rows.loc["all", "pass"])
    assert rows.loc["unrequested", "synthetic_dice"] == 0 and pd.isna(rows.loc["unrequested", "pass"])  # a leak: no target
    # a generator that leaks nothing: an empty unrequested row, n 0, still no pass
    clean = consistency_table(syn[syn["subject"] != "s2"], real, "tumour", "R", "in_distribution",
                              requested=requested).set_index(["class", "subset"])
    assert clean.loc[("tumour", "unrequested"), "n_synthetic"] == 0
    assert pd.isna(clean.loc[("tumour", "unrequested"), "pass"]) and bool(clean.loc[("tumour", "all"), "pass"])
    with pytest.raises(InputError, match="dc_tumour"):
        requested_samples(manifest.drop(columns="dc_tumour"), CLASSES, lesion_types)
