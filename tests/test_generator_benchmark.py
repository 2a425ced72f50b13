"""The generator benchmark table: Dice, deltas and tests by hand, compute from benchmark files,
and comparisons checked with the field named."""

import math

import numpy as np
import pandas as pd
import pytest

from brainsynth import generator_benchmark as gb
from brainsynth.errors import InputError


def _scores(values, task="t"):
    """values: arm -> {subject: (dice class a, dice class b)} on test set 'id'."""
    rows = []
    for arm, per_subject in values.items():
        for subject, dices in per_subject.items():
            for cls, v in zip(("a", "b"), dices):
                rows.append({"task": task, "arm": arm, "test_set": "id", "subject": subject, "class": cls,
                             "metric": "dice", "value": v})
                rows.append({"task": task, "arm": arm, "test_set": "id", "subject": subject, "class": cls,
                             "metric": "hd95", "value": 9.0})
    return pd.DataFrame(rows)


SCORES = _scores({
    "R": {"s1": (0.8, 0.6), "s2": (0.9, 0.7), "s3": (0.7, 0.5), "s4": (0.85, 0.65), "s5": (0.75, 0.55),
          "s6": (0.8, 0.7)},
    "Sg": {"s1": (0.5, 0.3), "s2": (0.6, 0.4), "s3": (0.4, 0.2), "s4": (0.55, 0.35), "s5": (0.45, 0.25),
           "s6": (0.5, 0.4)},
})
ARMS = {"R": {"generator": "brainspade", "n_real": 6, "n_synthetic": 0},
        "Sg": {"generator": "gmm", "n_real": 0, "n_synthetic": 6}}
COMPARISONS = [{"task": "t", "test_set": "id", "reference": "R", "arms": ["Sg"]}]


def test_table_by_hand():
    compute = {"gmm": {"training_s": 10.0, "sampling_s_per_volume": 0.5, "peak_rss_mb": 300.0}}
    table = gb.benchmark_table(SCORES, COMPARISONS, ARMS, compute).set_index("arm")
    # per-subject means over the two classes: R 0.7, 0.8, 0.6, 0.75, 0.65, 0.75; Sg 0.4, 0.5, 0.3, 0.45, 0.35, 0.45
    assert table.loc["R", "dice_mean"] == pytest.approx(4.25 / 6)
    assert table.loc["Sg", "dice_mean"] == pytest.approx(2.45 / 6)
    assert table.loc["Sg", "dice_std"] == pytest.approx(np.std([0.4, 0.5, 0.3, 0.45, 0.35, 0.45], ddof=1))
    assert table.loc["Sg", "delta_vs_reference"] == pytest.approx(-0.3)
    assert table.loc["Sg", "dice_a"] == pytest.approx(0.5) and table.loc["Sg", "dice_b"] == pytest.approx(0.3167, abs=1e-4)
    # six paired differences all -0.3: the exact two-sided Wilcoxon p is 2 / 2**6
    assert table.loc["Sg", "p_vs_reference"] == pytest.approx(2 / 64)
    assert math.isnan(table.loc["R", "p_vs_reference"])
    assert table.loc["R", "generator"] == "real" and math.isnan(table.loc["R", "training_s"])
    assert table.loc["Sg", "training_s"] == 10.0 and table.loc["Sg", "n_test"] == 6
    assert math.isnan(table.loc["Sg", "image_fid"])  # not measured: no FID table given


def test_image_quality_joins_per_task_and_generator():
    fid = {("t", "gmm"): pd.DataFrame([
        {"set": "held_out_real (id)", "fid": 0.1, "precision": 0.9, "recall": 0.8},
        {"set": "synthetic", "fid": 2.5, "precision": 0.3, "recall": 0.2}])}
    table = gb.benchmark_table(SCORES, COMPARISONS, ARMS, {}, fid).set_index("arm")
    assert table.loc["Sg", ["image_fid", "image_precision", "image_recall"]].tolist() == [2.5, 0.3, 0.2]
    assert table.loc["R", ["image_fid", "image_precision", "image_recall"]].tolist() == [0.1, 0.9, 0.8]


def test_an_arm_of_the_same_name_in_another_task_is_not_mixed_in():
    other = _scores({"R": {"s1": (0.1, 0.1), "s2": (0.1, 0.1)}, "Sg": {"s1": (0.0, 0.0)}}, task="u")
    table = gb.benchmark_table(pd.concat([SCORES, other]), COMPARISONS, ARMS, {}).set_index("arm")
    assert table.loc["R", "dice_mean"] == pytest.approx(4.25 / 6) and table.loc["Sg", "n_test"] == 6
    assert list(table["reference"]) == [True, False]


def _bench(path, s, rss):
    pd.DataFrame([{"s": s, "h:m:s": "0:00:01", "max_rss": rss, "max_vms": 1, "max_uss": 1, "max_pss": 1,
                   "io_in": 0, "io_out": 0, "mean_load": 0, "cpu_time": s}]).to_csv(path, sep="\t", index=False)


def test_compute_from_benchmark_files(tmp_path):
    _bench(tmp_path / "train_label_vae.tsv", 100.0, 500.0)
    _bench(tmp_path / "train_label_ldm.tsv", 50.0, 800.0)
    _bench(tmp_path / "synthesize_gmm.tsv", 4.0, "NA")
    out = gb.generator_compute(["train_label_vae", "train_label_ldm"], "synthesize_gmm", 8, tmp_path)
    assert out == {"training_s": 150.0, "sampling_s_per_volume": 0.5, "peak_rss_mb": 800.0}
    missing = gb.generator_compute(["train_label_vae", "train_image_generator"], "synthesize_gmm", 8, tmp_path)
    assert math.isnan(missing["training_s"]) and math.isnan(missing["peak_rss_mb"])
    assert missing["sampling_s_per_volume"] == 0.5
    assert gb.generator_compute([], "synthesize_gmm", 8, tmp_path)["training_s"] == 0


def test_outputs_and_an_unscored_arm(tmp_path):
    paths = {k: tmp_path / f"generators.{e}" for k, e in (("csv", "csv"), ("md", "md"), ("tex", "tex"),
                                                          ("figure", "png"))}
    gb.write_benchmark(SCORES, COMPARISONS, ARMS, {}, paths)
    assert pd.read_csv(paths["csv"])["arm"].tolist() == ["R", "Sg"]
    md = paths["md"].read_text()
    assert "0.408 (0.074)" in md and "n/a" in md and "Wilcoxon" in md
    row = next(line for line in md.splitlines() if line.startswith("| Sg"))
    assert "t / id" in row and "gmm" in row and "0 + 6" in row and "nan" not in md
    with pytest.raises(InputError, match="Sx"):
        gb.benchmark_table(SCORES, [{**COMPARISONS[0], "arms": ["Sx"]}], {**ARMS, "Sx": ARMS["Sg"]}, {})


def test_comparisons_are_checked_with_the_field_named():
    task_arms = {"t": ["R", "Sg"]}
    test_sets = {"t": ["id"]}
    assert gb.check_comparisons(COMPARISONS, task_arms, test_sets) == []
    problems = gb.check_comparisons([{"task": "u", "test_set": "id", "reference": "R", "arms": ["Sg"]},
                                     {"task": "t", "test_set": "ood", "reference": "R", "arms": ["Sz"]},
                                     {"task": "t"}], task_arms, test_sets)
    text = [str(p) for p in problems]
    assert "comparisons[0].task" in text[0]
    assert any("comparisons[1].arms" in t and "Sz" in t for t in text)
    assert any("comparisons[1].test_set" in t for t in text)
    assert any("comparisons[2]" in t and "lacks" in t for t in text)


CURVE = {"task": "t", "test_set": "id", "generators": ["gmm", "lesion_insertion"], "ratios": [0, 1, 2],
         "real_fractions": [0.25, 1.0], "seeds": [0, 1]}


def test_value_curve_arms_cover_both_curves_once_per_seed():
    arms = gb.value_curve_arms(CURVE)
    # points (real fraction, synthetic ratio): (1, 0) (1, 1) (1, 2) from the ratios, (0.25, 0) (0.25, 1)
    # from the fractions; (1, 0) and (1, 1) shared; real-only points once, not per generator
    assert len(arms) == (2 + 3 * 2) * 2
    assert arms["VC_R100_S000_seed1"]["recipe"] == {"real": 1.0, "synthetic": 0.0, "relative_to": "real",
                                                    "nnunet_seed": 1}
    assert arms["VC_R025_S100_gmm_seed0"]["recipe"] == {"real": 0.25, "synthetic": 1.0, "relative_to": "real",
                                                        "nnunet_seed": 0, "generator": "gmm"}
    assert arms["VC_R100_S200_lesion_insertion_seed1"]["synthetic_ratio"] == 2.0
    assert {a["generator"] for a in arms.values()} == {"real", "gmm", "lesion_insertion"}
    defaults = gb.value_curve_arms({"task": "t", "test_set": "id", "generators": ["gmm"]})
    # defaults: ratios 0, .5, 1, 2, 4 and fractions .05, .25, 1 with 1x synthetic, 2 seeds
    assert len(defaults) == (3 + 4 + 2) * 2 and "VC_R005_S100_gmm_seed1" in defaults


@pytest.mark.parametrize("bad, field", [({"real_fractions": [0]}, "real_fractions"),
                                        ({"seeds": [1, 1]}, "seeds"), ({"generators": []}, "value_curve")])
def test_value_curve_config_errors_name_the_field(bad, field):
    with pytest.raises(InputError, match=f"generator_benchmark.value_curve.*{field}|{field}"):
        gb.value_curve_arms({**CURVE, **bad})


def test_value_curve_table_by_hand(tmp_path):
    arms = {a: v for a, v in gb.value_curve_arms(CURVE).items()}
    per_arm = {}
    for i, (arm, info) in enumerate(arms.items()):
        base = 0.5 + 0.1 * info["synthetic_ratio"] + 0.2 * info["real_fraction"] + 0.01 * info["seed"]
        per_arm[arm] = {"s1": (base, base - 0.1), "s2": (base + 0.1, base)}
    scores = _scores(per_arm)
    table = gb.value_curve_table(scores, arms, "t", "id").set_index(["generator", "real_fraction", "synthetic_ratio"])
    row = table.loc[("gmm", 1.0, 2.0)]
    # per seed: mean over subjects of the class means = base; base = 0.5 + 0.2 + 0.2 + 0.01 seed
    assert row["n_seeds"] == 2 and row["n_test"] == 2
    assert row["dice_mean"] == pytest.approx(0.905)
    assert row["dice_seed_std"] == pytest.approx(np.std([0.9, 0.91], ddof=1))
    assert (row["dice_seed_min"], row["dice_seed_max"]) == (pytest.approx(0.9), pytest.approx(0.91))
    assert table.loc[("real", 0.25, 0.0), "dice_mean"] == pytest.approx(0.555)
    assert len(table) == 2 + 3 * 2
    paths = {k: tmp_path / f"curve.{k}" for k in ("csv", "md", "tex")} | {"figure": tmp_path / "curve.png"}
    gb.write_value_curve(scores, arms, "t", "id", paths)
    assert pd.read_csv(paths["csv"]).shape[0] == 8 and paths["figure"].stat().st_size > 0
    assert "seed" in paths["md"].read_text() and "\\begin{tabular}" in paths["tex"].read_text()
