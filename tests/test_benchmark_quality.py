"""The generator benchmark's per-generator quality table against hand-built cohorts."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth import generator_benchmark as gen_bench
from brainsynth.errors import InputError
from brainsynth.generators import benchmark_quality as BQ
from brainsynth.generators import label_quality as LQ
from brainsynth.labels import LabelSchema

SCHEMA = LabelSchema()
V = {n: SCHEMA.value(n) for n in ("csf", "gm", "wm", "deep_gm", "brainstem", "oedema")}


def brain(csf_rows, shape=(16, 16, 16)):
    """A cube of WM with a GM face, deep GM and brainstem blocks and ``csf_rows`` rows of CSF."""
    lab = np.zeros(shape, np.uint8)
    lab[1:15, 1:15, 1:15] = V["wm"]
    lab[1:15, 1:15, 1:3] = V["gm"]
    lab[6:9, 6:9, 6:9] = V["deep_gm"]
    lab[10:13, 10:13, 10:13] = V["brainstem"]
    lab[1:15, 1:1 + csf_rows, 3:15] = V["csf"]
    return lab


def _save(arr, path):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return str(path)


def _image(lab, rng):
    values = np.linspace(0, 1, SCHEMA.n_classes, dtype=np.float32)
    return values[lab] + 0.05 * rng.standard_normal(lab.shape).astype(np.float32)


def _cohort(tmp_path, labels, prefix, rng):
    out = {}
    for i, lab in enumerate(labels):
        prob = np.eye(SCHEMA.n_classes, dtype=np.float32)[lab]
        out[f"{prefix}{i}"] = {"labelprob": _save(prob, tmp_path / f"{prefix}{i}_prob.nii.gz"),
                               "t1": _save(_image(lab, rng), tmp_path / f"{prefix}{i}_t1.nii.gz")}
    return out


def test_conditioning_table_reads_dc_values_or_requested_voxels():
    spade = pd.DataFrame({"subject": ["synth0001"], "seed": [7], "conditioning_mode": ["random"],
                          "dc_wmh": [0.3], "dc_tumour": [0.0], "style_t1": ["demo1"]})
    assert list(BQ.conditioning_table(spade, SCHEMA).columns) == ["subject", "conditioning_mode", "dc_wmh",
                                                                   "dc_tumour"]
    inserted = pd.DataFrame({"subject": ["synth0001", "synth0002"], "conditioning_mode": ["random"] * 2,
                             "requested_wmh": [0, 40], "requested_necrotic": [38, 0],
                             "requested_oedema": [459, 0], "requested_enhancing": [184, 0]})
    table = BQ.conditioning_table(inserted, SCHEMA).set_index("subject")
    assert table.loc["synth0001", "dc_tumour"] == 38 + 459 + 184 and table.loc["synth0001", "dc_wmh"] == 0
    assert table.loc["synth0002", "dc_wmh"] == 40 and table.loc["synth0002", "dc_tumour"] == 0
    with pytest.raises(InputError, match="requested_necrotic"):
        BQ.conditioning_table(inserted.drop(columns=["requested_necrotic"]), SCHEMA)


def test_generator_quality_hand_case(tmp_path):
    """Two samples: a copy of a training map (asked healthy, healthy) and one with a tumour asked
    healthy; their images identical to each other."""
    rng = np.random.default_rng(0)
    train_maps = [brain(1), brain(2), brain(3)]
    training = _cohort(tmp_path, train_maps, "tr", rng)
    held = {s: spec["labelprob"] for s, spec in _cohort(tmp_path, [brain(5), brain(6)], "ho", rng).items()}
    copy, with_tumour = brain(2), brain(1)
    with_tumour[3:6, 3:6, 3:6] = V["oedema"]
    image = _image(copy, rng)
    samples = {}
    for sid, lab in (("synth0001", copy), ("synth0002", with_tumour)):
        samples[sid] = {"label": _save(lab, tmp_path / f"{sid}_label.nii.gz"),
                        "t1": _save(image, tmp_path / f"{sid}_t1.nii.gz")}
    cond = pd.DataFrame({"subject": ["synth0001", "synth0002"], "conditioning_mode": ["healthy"] * 2,
                         "dc_wmh": [0.0, 0.0], "dc_tumour": [0.0, 0.0]})
    q = BQ.generator_quality(samples, cond, training, held, ["t1"], SCHEMA).set_index(["measure", "item"])

    assert q.loc[("ms_ssim", "t1"), "synthetic"] == pytest.approx(1.0, abs=1e-4)  # identical images
    assert q.loc[("ms_ssim", "t1"), "real"] < 0.99
    assert q.loc[("conditioning_adherence", "all"), "synthetic"] == 0.5  # the tumour asked healthy
    # CSF fraction by hand: CSF voxels over brain voxels
    frac = [float((m == V["csf"]).sum()) / float((m > 0).sum()) for m in (copy, with_tumour)]
    frac_train = [float((m == V["csf"]).sum()) / float((m > 0).sum()) for m in train_maps]
    pooled = np.sqrt((np.var(frac, ddof=1) + 2 * np.var(frac_train, ddof=1)) / 3)
    assert q.loc[("cohens_d", "csf"), "synthetic"] == pytest.approx((np.mean(frac) - np.mean(frac_train)) / pooled)
    d = q.xs("cohens_d", level="measure")["synthetic"]
    assert q.loc[("mean_abs_cohens_d", "tissues"), "synthetic"] == pytest.approx(np.nanmean(np.abs(d)))
    # the copy's nearest training map is itself (Dice 1); held-out subjects are further away
    n = SCHEMA.n_classes
    near_tumour = max(LQ.mean_label_dice(with_tumour, m, n) for m in train_maps)
    assert q.loc[("nearest_training_dice", "mean"), "synthetic"] == pytest.approx((1.0 + near_tumour) / 2)
    near_held = [max(LQ.mean_label_dice(h, m, n) for m in train_maps) for h in (brain(5), brain(6))]
    assert q.loc[("nearest_training_dice", "mean"), "real"] == pytest.approx(np.mean(near_held))
    assert max(near_held) < 1.0
    expected_closer = (1 + (near_tumour > max(near_held))) / 2
    assert q.loc[("closer_than_held_out", "share"), "synthetic"] == pytest.approx(expected_closer)

    with pytest.raises(InputError, match="at least 2"):
        BQ.generator_quality({"synth0001": samples["synth0001"]}, cond, training, held, ["t1"], SCHEMA)


def test_benchmark_rows_carry_sample_quality():
    """Generator rows take their generator's figures, real rows the real baselines; MS-SSIM is read
    in the task's modalities only."""
    quality = {"gmm": pd.DataFrame([
        {"measure": "ms_ssim", "item": "t1", "synthetic": 0.90, "real": 0.98},
        {"measure": "ms_ssim", "item": "flair", "synthetic": 0.80, "real": 0.96},
        {"measure": "mean_abs_cohens_d", "item": "tissues", "synthetic": 1.5, "real": 0.0},
        {"measure": "conditioning_adherence", "item": "all", "synthetic": 0.75, "real": np.nan},
        {"measure": "nearest_training_dice", "item": "mean", "synthetic": 0.55, "real": 0.64},
        {"measure": "closer_than_held_out", "item": "share", "synthetic": 0.1, "real": np.nan}])}
    scores = pd.DataFrame([{"task": "t", "arm": a, "test_set": "ts", "subject": s, "class": "c", "metric": "dice",
                            "value": v} for a, vals in (("R", [0.8, 0.9]), ("S", [0.6, 0.7]))
                           for s, v in zip(["a", "b"], vals)])
    arms = {"R": {"generator": "brainspade", "n_real": 5, "n_synthetic": 0},
            "S": {"generator": "gmm", "n_real": 0, "n_synthetic": 5}}
    comp = [{"task": "t", "test_set": "ts", "reference": "R", "arms": ["S"]}]
    table = gen_bench.benchmark_table(scores, comp, arms, {}, quality=quality,
                                      task_modalities={"t": ["t1"]}).set_index("arm")
    assert table.loc["S", "ms_ssim"] == 0.90 and table.loc["R", "ms_ssim"] == 0.98
    assert table.loc["S", "volume_abs_d"] == 1.5 and np.isnan(table.loc["R", "volume_abs_d"])
    assert table.loc["S", "conditioning_adherence"] == 0.75
    assert table.loc["S", "nearest_training_dice"] == 0.55 and table.loc["R", "nearest_training_dice"] == 0.64
    both = gen_bench.benchmark_table(scores, comp, arms, {}, quality=quality).set_index("arm")
    assert both.loc["S", "ms_ssim"] == pytest.approx(0.85)
    unscored = gen_bench.benchmark_table(scores, comp, arms, {}, quality=quality,
                                         task_modalities={"t": ["t2"]}).set_index("arm")
    assert unscored["ms_ssim"].isna().all()  # no table scored T2: no figure, not a partial one
