"""Tests of the label generator (VAE + LDM), the SPADE image generator, sampling and quality metrics.

Tiny networks on 4 synthetic "brains" (nested spheres + a lesion) on a
16x20x16 grid, so every trainer runs in seconds on one CPU thread.
"""

import copy
import json
import logging
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainsynth.errors import InputError
from brainsynth.generators import common as C
from brainsynth.generators.brainspade import image_generator as IG
from brainsynth.generators.brainspade import label_generator as LG
from brainsynth.generators import quality as Q
from brainsynth.generators.brainspade import sampling as S
from brainsynth.labels import LabelSchema

torch.set_num_threads(1)

SHAPE = (16, 20, 16)
K = 10
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
T1 = np.array([0, .30, .60, .90, .70, .50, .20, .10, .40, .80], np.float32)
T2 = np.array([0, .90, .50, .30, .40, .60, .80, .70, .95, .60], np.float32)

LABEL_CFG = {
    "device": "cpu", "seed": 3, "checkpoint_every": 5, "log_every": 5,
    "vae": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4, "latent_channels": 2,
            "patch_size": None,
            "steps": 20, "batch_size": 2, "lr": 2e-3, "adv_weight": 0.01, "adv_warmup_steps": 14, "disc_channels": 8,
            "disc_layers": 1},
    "ldm": {"channels": [8, 8, 8], "attention_levels": [False, False, True], "num_head_channels": 4,
            "norm_num_groups": 4, "steps": 12, "batch_size": 2, "num_train_timesteps": 40},
    "sampling": {"scheduler": "ddim", "inference_steps": 5, "batch_size": 2},
}
IMAGE_CFG = {
    "device": "cpu", "seed": 5, "steps": 8, "batch_size": 2, "channels": [8, 8, 16], "z_dim": 8,
    "spade_hidden": 8, "checkpoint_every": 4, "log_every": 4,
    "disc": {"num_d": 1, "num_layers_d": 1, "channels": 8}, "weights": {"modality": 1.0},
}


def _cfg(base, **over):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def _brain(i, rng):
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(float)
    c = np.array(SHAPE) / 2 + rng.normal(0, 0.6, 3)
    r = np.linalg.norm((g - c) / np.array([1.0, 1.2, 1.0]), axis=-1)
    lab = np.zeros(SHAPE, np.uint8)
    lab[r < 7] = 1
    lab[r < 6] = 2
    lab[r < 4.5] = 3
    lab[r < 2] = 4
    lc = c + rng.normal(0, 1.5, 3)
    les = (np.linalg.norm(g - lc, axis=-1) < (2.0 if i % 2 == 0 else 1.3)) & (lab > 0)
    lab[les] = 8 if i % 2 == 0 else 6
    return lab


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    labs, lps, ims, rows = [], [], {"t1": [], "t2": []}, []
    for i in range(4):
        lab = _brain(i, rng)
        labs.append(lab)
        prob = np.eye(K, dtype=np.float32)[lab]
        p = d / f"sub{i}_labelprob.nii.gz"
        nib.save(nib.Nifti1Image(prob, AFFINE), p)
        lps.append(str(p))
        for m, lut in (("t1", T1), ("t2", T2)):
            pp = d / f"sub{i}_{m}.nii.gz"
            nib.save(nib.Nifti1Image(lut[lab], AFFINE), pp)
            ims[m].append(str(pp))
        rows.append({"subject": f"sub{i}", "dc_wmh": float((lab == 6).sum()), "dc_tumour": float((lab >= 7).sum())})
    df = pd.DataFrame(rows)
    for c in ("dc_wmh", "dc_tumour"):
        df[c] = df[c] / df[c].max()
    df.to_csv(d / "conditioning.tsv", sep="\t", index=False)
    return {"dir": d, "labels": labs, "label_paths": lps, "image_paths": ims, "cond": d / "conditioning.tsv"}


@pytest.fixture(scope="module")
def models(cohort, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    vae = LG.train_label_vae(cohort["label_paths"], LABEL_CFG, d / "vae")
    ldm = LG.train_label_ldm(vae["model"], cohort["label_paths"], cohort["cond"], LABEL_CFG, d / "ldm")
    img = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], IMAGE_CFG, d / "img")
    return {"vae": vae, "ldm": ldm, "img": img}


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


# --------------------------------------------------------------------------- label VAE


def test_label_vae_outputs_and_loss_decreases(models):
    vae = models["vae"]
    for key in ("model", "config", "losses_tsv", "losses_png"):
        assert vae[key].exists(), key
    hist = pd.read_csv(vae["losses_tsv"], sep="\t")
    assert list(hist["step"]) == list(range(1, 21))
    assert {"reconstruction", "kl", "gen_adv", "disc"} <= set(hist.columns)
    assert hist["reconstruction"].iloc[-5:].mean() < 0.6 * hist["reconstruction"].iloc[:3].mean()
    assert (hist["disc"].iloc[14:] > 0).all() and (hist["disc"].iloc[:14] == 0).all()  # GAN after warm-up


def test_vae_kill_and_resume_matches_uninterrupted(cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, checkpoint_every=2, vae={"steps": 6, "adv_warmup_steps": 2})

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "a", callback=kill_at_5)
    assert not (tmp_path / "a" / "label_vae.pt").exists()
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "label_vae_last.pt", weights_only=False)
    assert ckpt["step"] == 4
    seen = []
    out = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "a", callback=seen.append)
    assert seen == [5, 6]  # resumed after the last checkpoint, no step repeated before it
    assert [h["step"] for h in out["history"]] == list(range(1, 7))
    ref = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "b")
    _same_weights(_state(out["model"]), _state(ref["model"]))
    # a rerun after completion trains nothing and rewrites the same model
    seen.clear()
    LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "a", callback=seen.append)
    assert seen == []


def test_changed_config_does_not_resume(cohort, tmp_path, caplog):
    cfg = _cfg(LABEL_CFG, checkpoint_every=2, vae={"steps": 4, "adv_weight": 0.0})
    r = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path, max_steps_this_run=2)
    assert r["completed"] is False
    seen = []
    with caplog.at_level(logging.WARNING):
        LG.train_label_vae(cohort["label_paths"], _cfg(cfg, vae={"lr": 1e-3}), tmp_path, callback=seen.append)
    assert seen == [1, 2, 3, 4]
    assert "another configuration" in caplog.text


def test_scheduled_lr_by_hand():
    assert C.scheduled_lr(1e-3, 7, 10, "constant") == 1e-3
    assert C.scheduled_lr(1e-3, 1, 10, "cosine") == pytest.approx(1e-3)  # first step: the full rate
    assert C.scheduled_lr(1e-3, 6, 10, "cosine") == pytest.approx(0.5e-3)  # half way: half of it
    assert C.scheduled_lr(1e-3, 10, 10, "cosine") == pytest.approx(0.5e-3 * (1 + np.cos(0.9 * np.pi)))
    with pytest.raises(InputError, match="lr_schedule"):
        C.scheduled_lr(1e-3, 1, 10, "step")


def test_best_weights_keep_the_best_score():
    live = torch.nn.Linear(1, 1, bias=False)
    best = C.BestWeights(live)
    for step, (w, score) in enumerate([(1.0, 0.2), (2.0, 0.7), (3.0, 0.5)], start=1):
        with torch.no_grad():
            live.weight.fill_(w)
        best.offer(step, score, live)
    assert float(best.model.weight) == 2.0 and float(best.score) == 0.7 and int(best.step) == 2
    again = C.BestWeights(torch.nn.Linear(1, 1, bias=False))
    again.load_state_dict(best.state_dict())  # what a checkpoint restores
    assert float(again.model.weight) == 2.0 and int(again.step) == 2


class _Decodes(torch.nn.Module):
    """A stand-in autoencoder whose decoded logits are a fixed map's one-hot (hand-checkable score)."""

    def __init__(self, decoded, n_classes):
        super().__init__()
        self.decoded = torch.nn.functional.one_hot(decoded.long(), n_classes).movedim(-1, 1).float()

    def encode(self, x):
        return x, x

    def decode_stage_2_outputs(self, z):
        return self.decoded[: z.shape[0]]


def test_reconstruction_score_by_hand():
    truth = torch.tensor([[[0, 1, 1, 2]], [[0, 1, 0, 0]]])  # two maps (1 x 4 voxels), classes 0-3
    data = torch.nn.functional.one_hot(truth, 4).movedim(-1, 1).float()
    assert LG.reconstruction_score(_Decodes(truth, 4), data, truth, "cpu")[0] == 1.0
    decoded = torch.tensor([[[0, 1, 2, 2]], [[0, 1, 0, 3]]])  # class 3 decoded in a map without it
    score, dice = LG.reconstruction_score(_Decodes(decoded, 4), data, truth, "cpu")
    # pooled over the two maps: class 1: 2 * 2 / (3 + 2); class 2: 2 * 1 / (1 + 2); class 3: 0
    assert dice == pytest.approx({1: 0.8, 2: 2 / 3, 3: 0.0})
    assert score == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)


def test_vae_keeps_its_best_checkpoint_and_resumes(cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, checkpoint_every=3, vae={"steps": 8, "adv_weight": 0.0, "lr": 2e-2,
                                                   "lr_schedule": "cosine", "select_every": 2})
    paths = cohort["label_paths"]
    ref = LG.train_label_vae(paths, cfg, tmp_path / "a")
    p = torch.load(ref["model"], weights_only=False)
    assert p["selected_step"] in (2, 4, 6, 8)
    data = torch.from_numpy(np.stack([C.load_prob_label(x, K) for x in paths]))
    data = C.pad_background(data, p["padded_shape"])
    vae = LG.load_vae(ref["model"])[0]
    score = LG.reconstruction_score(vae, data, data.argmax(1), "cpu", amp=p["training_amp"])[0]
    assert score == pytest.approx(p["selection_score"])
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "label_vae_last.pt", weights_only=False)["modules"]
    _same_weights(p["state_dict"], {k[len("model."):]: v for k, v in ckpt["best"].items() if k.startswith("model.")})
    if p["selected_step"] != 8:
        assert any(not torch.allclose(p["state_dict"][k].float(), ckpt["vae"][k].float()) for k in ckpt["vae"])
    assert LG.train_label_vae(paths, cfg, tmp_path / "b", max_steps_this_run=5)["completed"] is False
    out = LG.train_label_vae(paths, cfg, tmp_path / "b")  # the selection survives the kill
    q = torch.load(out["model"], weights_only=False)
    assert (q["selected_step"], q["selection_score"]) == (p["selected_step"], p["selection_score"])
    _same_weights(q["state_dict"], p["state_dict"])
    # the cosine schedule spans the steps: more steps is another training, not a continuation
    seen = []
    LG.train_label_vae(paths, _cfg(cfg, vae={"steps": 10}), tmp_path / "a", callback=seen.append)
    assert seen[0] == 1
    with pytest.raises(InputError, match="select_every"):
        LG.train_label_vae(paths, _cfg(cfg, vae={"select_every": -1}), tmp_path / "c")
    with pytest.raises(InputError, match="lr_schedule"):
        LG.train_label_vae(paths, _cfg(cfg, vae={"lr_schedule": "step"}), tmp_path / "c")


def test_fit_class_offsets_by_hand():
    # one map of 1 x 6 voxels, classes 0-2; the class-1 voxels are decoded with class 2 ahead by 0.3
    truth = torch.tensor([[[0, 1, 1, 2, 2, 0]]])
    logits = torch.tensor([[[[1.0, 0, 0, 0, 0, 1]], [[0, .5, .5, 0, 0, 0]], [[0, .8, .8, 1, 1, 0]]]])
    # as decoded: [0, 2, 2, 2, 2, 0]: class 1 Dice 0, class 2 2 * 2 / (2 + 4)
    offsets, before, score = LG.fit_class_offsets(logits, truth, classes=[0, 1, 2])
    # class 0 first: no step helps; class 1: +0.1 and +0.25 leave it behind, +0.5 wins its voxels back
    assert offsets.tolist() == [0.0, 0.5, 0.0] and score == 1.0
    assert before == pytest.approx((0.0 + 2 / 3) / 2)
    # classes left out keep offset 0: shifting background alone cannot give class 1 its voxels
    offsets, _, score = LG.fit_class_offsets(logits, truth, classes=[0])
    assert offsets.tolist() == [0.0, 0.0, 0.0] and score == pytest.approx((0.0 + 2 / 3) / 2)


def test_calibration_classes_of_each_mode():
    schema = LabelSchema()
    lesions = {schema.value(c) for c in schema.lesion_classes}
    tissue = LG.calibration_classes("tissue", K, schema)
    assert tissue == [c for c in range(K) if c not in lesions] and 0 in tissue and schema.value("csf") in tissue
    assert LG.calibration_classes("all", K, schema) == list(range(K))
    assert LG.calibration_classes("none", K, schema) == []
    with pytest.raises(InputError, match="label_generator.calibration"):
        LG.calibration_classes("csf", K, schema)


def test_calibrated_vae_decodes_with_its_offsets(models, cohort, tmp_path):
    schema = LabelSchema()
    model = models["vae"]["model"]
    rec = LG.calibrate_label_vae(model, cohort["label_paths"], "tissue", tmp_path / "cal.json", schema=schema,
                                 device="cpu")
    saved = json.loads((tmp_path / "cal.json").read_text())
    assert saved["class_offsets"] == rec["class_offsets"] and len(saved["class_offsets"]) == K
    assert saved["n_maps"] == 4 and saved["score_after"] >= saved["score_before"]
    assert all(saved["class_offsets"][schema.value(c)] == 0 for c in schema.lesion_classes)
    temperature = saved["temperature"]
    assert 0.2 <= temperature <= 5.0 and rec["temperature"] == temperature
    raw, _ = LG.load_vae(model)
    calibrated, pay = LG.load_vae(model, calibration=tmp_path / "cal.json")
    z = torch.randn(1, pay["vae_kwargs"]["latent_channels"], 8, 10, 8)
    with torch.no_grad():
        got, trained = LG.decoded_logits(calibrated, z), LG.decoded_logits(raw, z)
    offsets = torch.tensor(saved["class_offsets"]).view(1, -1, 1, 1, 1)
    assert torch.allclose(got, (trained + offsets) / temperature, atol=1e-5)
    # the temperature moves no argmax: the classes are the offsets' alone
    assert torch.equal(got.argmax(1), (trained + offsets).argmax(1))
    # a calibration of before the temperature (none stored) decodes with the offsets alone
    (tmp_path / "old.json").write_text(json.dumps({"class_offsets": saved["class_offsets"]}))
    with torch.no_grad():
        old = LG.decoded_logits(LG.load_vae(model, calibration=tmp_path / "old.json")[0], z)
    assert torch.allclose(old, trained + offsets, atol=1e-5)
    # calibration off: no offsets, the decoder as trained
    LG.calibrate_label_vae(model, cohort["label_paths"], "none", tmp_path / "off.json", schema=schema, device="cpu")
    assert json.loads((tmp_path / "off.json").read_text())["class_offsets"] is None
    assert not hasattr(LG.load_vae(model, calibration=tmp_path / "off.json")[0], "class_offsets")
    (tmp_path / "short.json").write_text(json.dumps({"class_offsets": [0.1, 0.2]}))
    with pytest.raises(InputError, match="short.json"):
        LG.load_vae(model, calibration=tmp_path / "short.json")
    (tmp_path / "cold.json").write_text(json.dumps({"class_offsets": [0.0] * K, "temperature": 0}))
    with pytest.raises(InputError, match="temperature"):
        LG.load_vae(model, calibration=tmp_path / "cold.json")


def test_fit_temperature_by_hand():
    # maps that are exactly softmax(logits / 2): the fit finds T = 2; sharper maps, a smaller T
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]).T.reshape(1, 3, 2, 1, 1)
    assert LG.fit_temperature(logits, torch.softmax(logits / 2, dim=1)) == pytest.approx(2.0, rel=1e-3)
    assert LG.fit_temperature(logits, torch.softmax(logits / 0.5, dim=1)) == pytest.approx(0.5, rel=1e-3)
    # one-hot maps of the argmax: as sharp as the search allows (its lower bound)
    hard = torch.nn.functional.one_hot(logits.argmax(1), 3).movedim(-1, 1).float()
    assert LG.fit_temperature(logits, hard, bounds=(0.2, 5.0)) == pytest.approx(0.2, rel=1e-2)


def test_reconstruct_returns_the_maps_its_rows_score(models, cohort):
    """The audit's reconstructions: the VAE's argmax decoding of each map's posterior mean, the
    maps the reconstruction rows were scored on (the LDM's ceiling rows take their features)."""
    from brainsynth.generators import label_quality as LQ

    schema = LabelSchema()
    paths = {f"s{i}": p for i, p in enumerate(cohort["label_paths"][:2])}
    rows, given, decoded = LQ.reconstruct(models["vae"]["model"], paths, schema.names, "train")
    assert given.shape == decoded.shape == (2, *given.shape[1:]) and decoded.dtype == np.uint8
    vae, pay = LG.load_vae(models["vae"]["model"])
    for i, p in enumerate(paths.values()):
        x = torch.from_numpy(C.load_prob_label(p, K))[None]
        with torch.no_grad():
            mu, _ = vae.encode(C.pad_background(x, pay["padded_shape"]))
            expected = C.crop_to(LG.decoded_logits(vae, mu), pay["shape"])[0].argmax(0).numpy()
        assert np.array_equal(decoded[i], expected) and np.array_equal(given[i], x[0].argmax(0).numpy())
    expected_rows = [r for i in range(2)
                     for r in LQ.reconstruction_rows(given[i], decoded[i], schema.names, f"s{i}", "train")]
    pd.testing.assert_frame_equal(pd.DataFrame(rows), pd.DataFrame(expected_rows))
    assert LQ.reconstruct(models["vae"]["model"], {}, schema.names, "held_out")[1:] == (None, None)


def test_audit_distribution_rows_held_out_and_ceiling(models, cohort, tmp_path):
    """The audit's label FID / k-NN rows: held-out maps identical to the training maps sit on the
    real manifold (FID 0, precision = recall = 1); the ceiling rows score the VAE's decodings."""
    from brainsynth.feature_metrics import frechet_distance, knn_precision_recall
    from brainsynth.generators import label_quality as LQ

    schema = LabelSchema()
    maps = {f"sub{i}": p for i, p in enumerate(cohort["label_paths"])}
    out = {k: tmp_path / f"{k}.tsv" for k in ("reconstruction", "gate", "adherence", "samples", "fidelity")}
    out["figure"] = tmp_path / "adherence.png"
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    fid = LQ.evaluate_label_generator(vae, ldm, maps, maps, out, n_per_mode=2, device="cpu",
                                      sampling={"inference_steps": 3}).set_index("measure")
    assert fid.loc["fid_held_out_vs_training", "value"] == pytest.approx(0.0, abs=1e-6)
    assert fid.loc["precision_held_out", "value"] == fid.loc["recall_held_out", "value"] == 1.0
    real = LQ.label_features(vae, np.stack(cohort["labels"]), K)
    decoded = LQ.label_features(vae, LQ.reconstruct(vae, maps, schema.names, "held_out")[2], K)
    assert fid.loc["fid_reconstructed_held_out_vs_training", "value"] == pytest.approx(frechet_distance(real, decoded))
    p, r = knn_precision_recall(real, decoded)
    assert (fid.loc["precision_reconstructed_held_out", "value"], fid.loc["recall_reconstructed_held_out", "value"]) \
        == (p, r)
    n_samples = len(pd.read_csv(out["samples"], sep="\t"))
    assert fid.loc["fid_synthetic_vs_training", "n"] == n_samples
    assert fid.loc["fid_held_out_vs_training", "n"] == fid.loc["fid_reconstructed_held_out_vs_training", "n"] == 4
    # diversity like for like: every mode with training maps of its phenotype, gated; pooled rows ungated
    phenotypes = LQ.lesion_phenotypes(LQ.lesion_volumes(np.stack(cohort["labels"]), schema), schema.lesion_types)
    assert len(set(phenotypes)) > 1
    per = pd.read_csv(out["samples"], sep="\t")
    compared = [m for m in sorted(set(phenotypes) & set(per["mode"]))
                if (phenotypes == m).sum() >= 2 and (per["mode"] == m).sum() >= 2]
    assert compared == ["tumour_only", "wmh_only"]
    for mode in compared:
        row = fid.loc[f"pairwise_dice_{mode}_synthetic"]
        assert row["target"] == f"<= {fid.loc[f'pairwise_dice_{mode}_training', 'value'] + 0.02:g}"
        assert f"pairwise_dice_{mode}_reconstructed" in fid.index
    assert fid.loc["pairwise_dice_synthetic_all_modes", "target"] == ""
    assert not any(m.startswith("pairwise_dice_healthy") for m in fid.index)   # no healthy training map


def test_audit_judges_the_decoded_maps_and_reports_what_removal_takes(models, cohort, tmp_path):
    """With sampling.unrequested_lesions: remove the audit's adherence rows still judge the decoded
    maps (the leak stays visible, as with keep), a row per mode counts the voxels removed, and the
    other figures (tissue fractions here) are those of the maps as the samples carry them."""
    from brainsynth.generators import label_quality as LQ

    calibration = tmp_path / "oedema_offset.json"
    calibration.write_text(json.dumps({"class_offsets": [0.0] * 8 + [OEDEMA_OFFSET, 0.0]}))
    maps = {f"sub{i}": p for i, p in enumerate(cohort["label_paths"])}
    runs = {}
    for setting in ("keep", "remove"):
        out = {k: tmp_path / setting / f"{k}.tsv" for k in ("reconstruction", "gate", "adherence", "samples",
                                                            "fidelity")}
        out["figure"] = tmp_path / setting / "adherence.png"
        fid = LQ.evaluate_label_generator(models["vae"]["model"], models["ldm"]["model"], maps, maps, out,
                                          n_per_mode=2, device="cpu", calibration=calibration,
                                          sampling={"inference_steps": 3, "unrequested_lesions": setting})
        runs[setting] = (fid.set_index("measure"), pd.read_csv(out["samples"], sep="\t").set_index("sample"))
    (keep, keep_per), (remove, remove_per) = runs["keep"], runs["remove"]
    leak = remove_per["unrequested_lesion_voxels"]
    assert leak["healthy_000"] > 0 and (leak == keep_per["unrequested_lesion_voxels"]).all()
    assert remove.loc["healthy_unrequested_voxels", "value"] == leak[remove_per["mode"] == "healthy"].mean()
    assert "removed from the samples" in remove.loc["healthy_unrequested_voxels", "note"]
    assert "kept in the samples" in keep.loc["healthy_unrequested_voxels", "note"]
    adherence = [m for m in keep.index if m.endswith(("_unrequested_absent", "_any_lesion", "_requested_present"))]
    assert keep.loc["healthy_any_lesion", "value"] == 1.0                # the offset's oedema, decoded
    pd.testing.assert_series_equal(keep.loc[adherence, "value"], remove.loc[adherence, "value"])
    fractions = [c for c in keep_per.columns if c.startswith("fraction_")]
    moved = (keep_per[fractions] != remove_per[fractions]).any(axis=1)
    assert (moved == (leak > 0)).all()


def test_audit_reconstructs_with_the_vae_calibration_and_samples_with_the_sampling_one(models, cohort, tmp_path):
    """The audit's gate judges the VAE (its own calibration), its samples are drawn as sampling
    draws them (sampling_calibration: the fitted tissue offsets added): an oedema offset given as
    the sampling calibration reaches every healthy sample and no reconstruction."""
    from brainsynth.generators import label_quality as LQ

    sampling_cal = tmp_path / "oedema_offset.json"
    sampling_cal.write_text(json.dumps({"class_offsets": [0.0] * 8 + [OEDEMA_OFFSET, 0.0]}))
    warped_cal = tmp_path / "warped.json"
    warped_cal.write_text(json.dumps({"class_offsets": [0.0] * K, "deformation": {
        "std_mm": 0.0, "std_mm_by_phenotype": {"tumour": 2.5, "wmh": 1.0}, "spacing_mm": 24.0,
        "interpolation": "nearest", "voxel_mm": [4.0] * 3, "pairwise_dice_training": 0.7,
        "pairwise_dice_before": 0.9, "pairwise_dice_after": 0.71, "maps": 4}}))
    maps = {f"sub{i}": p for i, p in enumerate(cohort["label_paths"])}
    runs = {}
    for name, extra in (("plain", {}), ("sampling", {"sampling_calibration": sampling_cal}),
                        ("warped", {"sampling_calibration": warped_cal})):
        out = {k: tmp_path / name / f"{k}.tsv" for k in ("reconstruction", "gate", "adherence", "samples", "fidelity")}
        out["figure"] = tmp_path / name / "adherence.png"
        fid = LQ.evaluate_label_generator(models["vae"]["model"], models["ldm"]["model"], maps, maps, out,
                                          n_per_mode=2, device="cpu", sampling={"inference_steps": 3}, **extra)
        runs[name] = (fid.set_index("measure"), pd.read_csv(out["reconstruction"], sep="\t"))
    (plain, plain_rec), (sampled, sampled_rec) = runs["plain"], runs["sampling"]
    pd.testing.assert_frame_equal(plain_rec, sampled_rec)
    assert plain.loc["healthy_any_lesion", "value"] == 0.0 and sampled.loc["healthy_any_lesion", "value"] == 1.0
    # a deformation in the sampling calibration: the table says its size and the LDM's own diversity
    warped = runs["warped"][0]
    assert "deformation_std_mm" not in plain.index and "pairwise_dice_fit_maps_undeformed" not in plain.index
    assert warped.loc["deformation_std_mm_tumour", "value"] == 2.5
    assert warped.loc["deformation_std_mm_wmh", "value"] == 1.0
    assert "deformation_std_mm" not in warped.index          # one row per fitted phenotype instead
    assert warped.loc["pairwise_dice_fit_maps_undeformed", "value"] == 0.9
    assert "after the warp 0.710, training maps 0.700" in warped.loc["pairwise_dice_fit_maps_undeformed", "note"]


# --------------------------------------------------------------------------- LDM + sampling


def test_ldm_outputs_and_latent_padding(models):
    ldm = models["ldm"]
    for key in ("model", "config", "losses_tsv", "losses_png"):
        assert ldm[key].exists(), key
    p = torch.load(ldm["model"], weights_only=False)
    assert p["latent_shape"] == [8, 10, 8]
    assert p["padded_latent_shape"] == [8, 12, 8]  # divisible by 2**(3-1)
    assert p["lesion_types"] == ["wmh", "tumour"]
    assert p["unet_kwargs"]["cross_attention_dim"] == 3 and p["unet_kwargs"]["with_conditioning"]
    assert p["scale_factor"] > 0 and len(p["latent_scale"]) == len(p["latent_shift"]) == 2
    assert p["latent_range"][0] < 0 < p["latent_range"][1]  # x0 clipping range of the standardised latents
    assert p["train_conditioning"].shape == (4, 2)


def test_ldm_residual_latent_norm_draws_departures_from_the_mean_latent(models, cohort, tmp_path):
    """latent_norm residual: the stored shift is the training maps' mean latent, voxel by voxel; the
    LDM's latents are what is left, standardised per channel; sampling adds the mean back."""
    cfg = copy.deepcopy(LABEL_CFG)
    cfg["ldm"]["latent_norm"] = "residual"
    out = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "ldm")
    p = torch.load(out["model"], weights_only=False)
    vae, vpay = LG.load_vae(models["vae"]["model"])
    data, _, _ = LG._training_maps(cohort["label_paths"], 3, vpay["n_classes"])
    mu, _ = LG._encode_all(vae, C.pad_background(data, vpay["padded_shape"]), "cpu")
    shift = torch.tensor(p["latent_shift"])
    assert shift.shape == (2, 8, 10, 8)                                    # (C, *latent_shape)
    assert torch.allclose(shift, mu.mean(0), atol=1e-6)
    residual = (mu - shift) * torch.tensor(p["latent_scale"]).view(1, 2, 1, 1, 1)
    assert torch.allclose(residual.transpose(0, 1).reshape(2, -1).std(1), torch.ones(2), atol=1e-4)
    assert LG.latent_shift_tensor(p["latent_shift"], 2, 3).shape == (1, 2, 8, 10, 8)
    assert LG.latent_shift_tensor([0.5, 1.0], 2, 3).shape == (1, 2, 1, 1, 1)
    maps = LG.sample_labels(models["vae"]["model"], out["model"], np.zeros((2, 2), np.float32), progress=False)
    assert maps.shape == (2, K) + SHAPE and np.allclose(maps.sum(1), 1.0, atol=1e-4)
    # a different shift moves the decoded maps: sampling adds the stored mean latent back
    p["latent_shift"] = (shift + 3.0 * torch.randn(shift.shape, generator=torch.Generator().manual_seed(0))).tolist()
    torch.save(p, tmp_path / "moved.pt")
    moved = LG.sample_labels(models["vae"]["model"], tmp_path / "moved.pt", np.zeros((2, 2), np.float32),
                             progress=False)
    assert not np.allclose(moved, maps, atol=1e-3)


def test_ldm_resume_matches_uninterrupted(models, cohort, tmp_path):
    args = (models["vae"]["model"], cohort["label_paths"], cohort["cond"], LABEL_CFG, tmp_path)
    assert LG.train_label_ldm(*args, max_steps_this_run=7)["completed"] is False
    seen = []
    out = LG.train_label_ldm(*args, callback=seen.append)
    assert seen == list(range(8, 13))
    _same_weights(_state(out["model"]), _state(models["ldm"]["model"]))


def test_ema_update_by_hand():
    live = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        live.weight.fill_(0.0)
    ema = C.ema_copy(live)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        live.weight.fill_(1.0)
    C.ema_update(ema, live, decay=0.9, step=0)  # warm-up: min(0.9, 1/10) = 0.1 -> 0.1 * 0 + 0.9 * 1
    assert float(ema.weight) == pytest.approx(0.9)
    C.ema_update(ema, live, decay=0.5, step=1000)  # decay reached: 0.5 * 0.9 + 0.5 * 1
    assert float(ema.weight) == pytest.approx(0.95)


def test_ldm_ema_weights_are_saved_and_resume(models, cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, checkpoint_every=3, ldm={"ema_decay": 0.9, "steps": 6})
    args = (models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg)
    assert LG.train_label_ldm(*args, tmp_path / "a", max_steps_this_run=4)["completed"] is False
    out = LG.train_label_ldm(*args, tmp_path / "a")
    ref = LG.train_label_ldm(*args, tmp_path / "b")
    _same_weights(_state(out["model"]), _state(ref["model"]))  # the average survives a kill
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "label_ldm_last.pt", weights_only=False)["modules"]
    _same_weights(_state(ref["model"]), ckpt["ema"])
    last = ckpt["unet"]
    assert any(not torch.allclose(last[k].float(), ckpt["ema"][k].float()) for k in last)
    with pytest.raises(InputError, match="ema_decay"):
        LG.train_label_ldm(*args[:3], _cfg(cfg, ldm={"ema_decay": 1.0}), tmp_path / "c")


def test_sample_labels_probabilistic_and_deterministic(models):
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    cond = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], np.float32)
    a = LG.sample_labels(vae, ldm, cond, "ddim", 4, seed=11)
    assert a.shape == (3, K) + SHAPE and a.dtype == np.float32
    assert np.allclose(a.sum(1), 1.0, atol=1e-4) and a.min() >= 0
    b = LG.sample_labels(vae, ldm, cond, "ddim", 4, seed=11)
    np.testing.assert_array_equal(a, b)
    c = LG.sample_labels(vae, ldm, cond, "ddim", 4, seed=12)
    assert not np.allclose(a, c)
    d = LG.sample_labels(vae, ldm, cond[:2], "ddpm", None, seed=11)  # all 40 training steps
    assert d.shape == (2, K) + SHAPE and np.allclose(d.sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(d, LG.sample_labels(vae, ldm, cond[:2], "ddpm", None, seed=11))
    with pytest.raises(InputError):
        LG.sample_labels(vae, ldm, np.zeros((2, 3)), "ddim", 2)
    with pytest.raises(InputError, match="patch_size"):
        LG.train_label_vae(["unused"], _cfg(LABEL_CFG, vae={"patch_size": [8, 8]}), "unused")


def test_conditioning_helpers(models):
    types, train = LG.training_conditioning(models["ldm"]["model"])
    assert types == ["wmh", "tumour"]
    e = LG.make_conditioning("explicit", 3, types, values={"tumour": 0.4})
    np.testing.assert_allclose(e, [[0.0, 0.4]] * 3)
    r = LG.make_conditioning("random", 50, types, train, seed=1)
    assert r.shape == (50, 2) and {tuple(x) for x in r} <= {tuple(x) for x in train}
    np.testing.assert_array_equal(r, LG.make_conditioning("random", 50, types, train, seed=1))
    u = LG.make_conditioning("unseen", 20, types, train, seed=2)
    assert (u > 0).all()  # both lesion types at once: never seen in training
    assert not ((train > 0).all(1)).any()
    assert (LG.make_conditioning("healthy", 2, types) == 0).all()
    t = LG.make_conditioning("tumour_only", 30, types, train, seed=3)
    # one disease only, at values the training maps with a tumour hold
    assert (t[:, 0] == 0).all() and (t[:, 1] > 0).all() and set(t[:, 1]) <= set(train[train[:, 1] > 0, 1])
    with pytest.raises(InputError):
        LG.make_conditioning("explicit", 2, types, values={"glioma": 1.0})
    with pytest.raises(InputError):
        LG.make_conditioning("bogus", 2, types)
    with pytest.raises(InputError, match="glioma_only"):
        LG.make_conditioning("glioma_only", 2, types, train)


def test_label_generator_2d_mode(cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, spatial_dims=2, vae={"steps": 4, "adv_warmup_steps": 2, "patch_size": [8, 8]},
               ldm={"steps": 3, "channels": [8, 8], "attention_levels": [False, False]})
    vae = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "vae")
    ldm = LG.train_label_ldm(vae["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "ldm")
    assert torch.load(vae["model"], weights_only=False)["patch_size"] == [8, 8]  # trained on crops
    p = torch.load(ldm["model"], weights_only=False)
    assert p["latent_shape"] == [8, 10]  # whole slices encoded
    assert p["train_conditioning"].shape[1] == 2 and p["train_conditioning"].max() <= 1.0 + 1e-6
    s = LG.sample_labels(vae["model"], ldm["model"], np.array([[0.2, 0.0]]), "ddim", 3, seed=0)
    assert s.shape == (1, K) + SHAPE[:2] and np.allclose(s.sum(1), 1.0, atol=1e-4)
    residual = _cfg(cfg, ldm={"latent_norm": "residual"})
    with pytest.raises(InputError, match="latent_norm residual needs 3D"):
        LG.train_label_ldm(vae["model"], cohort["label_paths"], cohort["cond"], residual, tmp_path / "residual")


# --------------------------------------------------------------------------- image generator


def test_image_generator_outputs_and_generation(models, cohort):
    img = models["img"]
    for key in ("model", "config", "losses_tsv", "losses_png"):
        assert img[key].exists(), key
    hist = pd.read_csv(img["losses_tsv"], sep="\t")
    assert {"adv", "feature_matching", "kld", "slice_consistency", "modality_cls", "disc"} <= set(hist.columns)
    assert np.isfinite(hist.drop(columns="step").to_numpy()).all()
    p = torch.load(img["model"], weights_only=False)
    assert p["modalities"] == ["t1", "t2"] and p["padded_shape"] == [16, 24] and p["style_channels"] == 8
    prob = C.load_prob_label(cohort["label_paths"][0])
    styles = {"t1": C.load_image(cohort["image_paths"]["t1"][1]),                 # 3-D: slice-wise style
              "t2": C.load_image(cohort["image_paths"]["t2"][2])[..., 8]}          # 2-D: one style slice
    out = IG.generate_images(img["model"], prob, styles, seed=0)
    assert set(out) == {"t1", "t2"}
    for v in out.values():
        assert v.shape == SHAPE and v.dtype == np.float32 and 0 <= v.min() and v.max() <= 1
        assert (v[cohort["labels"][0] == 0] == 0).all()  # background masked
    again = IG.generate_images(img["model"], prob, styles, seed=0)
    np.testing.assert_array_equal(out["t1"], again["t1"])


def test_image_generator_resume_matches_uninterrupted(cohort, tmp_path):
    cfg = _cfg(IMAGE_CFG, steps=6, checkpoint_every=2)
    r = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path / "a",
                                 max_steps_this_run=3)
    assert r["completed"] is False
    seen = []
    a = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path / "a",
                                 callback=seen.append)
    assert seen == [4, 5, 6]
    assert [h["step"] for h in a["history"]] == list(range(1, 7))
    b = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path / "b")
    _same_weights(_state(a["model"]), _state(b["model"]))
    ha, hb = pd.read_csv(a["losses_tsv"], sep="\t"), pd.read_csv(b["losses_tsv"], sep="\t")
    np.testing.assert_allclose(ha.to_numpy(), hb.to_numpy(), rtol=1e-5, atol=1e-6)


def test_image_generator_patch_mode_sliding_window(cohort, tmp_path):
    cfg = _cfg(IMAGE_CFG, steps=3, channels=[8, 8], patch_size=[8, 8], sw_batch_size=2, style_channels=0)
    r = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path)
    prob = C.load_prob_label(cohort["label_paths"][1])
    out = IG.generate_images(r["model"], prob, {"t2": C.load_image(cohort["image_paths"]["t2"][0])}, seed=1)
    assert out["t2"].shape == SHAPE and np.isfinite(out["t2"]).all()
    net, payload = IG.load_generator(r["model"])
    assert payload["patch_size"] == [8, 8] and net.style_proj is None  # plain SPADENet


def _one_voxel_lesion_changes(model, prob, voxels):
    """Per voxel (x, y) of slice 8: whether a one-voxel WMH there changes the generated image."""
    net, payload = IG.load_generator(model)
    sty = {"t1": np.full(SHAPE, 0.5, np.float32)}
    base = IG.generate_images(model, prob, sty, net=net, payload=payload)["t1"]
    out = []
    for x, y in voxels:
        p = prob.copy()
        p[:, x, y, 8] = 0
        p[LabelSchema().names.index("wmh"), x, y, 8] = 1
        out.append(bool(np.abs(IG.generate_images(model, p, sty, net=net, payload=payload)["t1"] - base).max() > 0))
    return out


def test_image_generator_output_block_sees_every_voxel(cohort, tmp_path):
    # MONAI's SPADE decoder meets the label map last at half resolution (nearest neighbour):
    # a lesion on an odd row or column never reaches the image. The full-resolution output
    # block sees all four voxels of each 2x2 cell.
    prob = C.load_prob_label(cohort["label_paths"][0])
    voxels = [(8, 12), (9, 12), (8, 13), (9, 13)]
    seen = {}
    for width, norm in ((0, "instance"), (8, "batch")):
        cfg = _cfg(IMAGE_CFG, steps=3, output_block_channels=width, norm=norm)
        r = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path / str(width))
        p = torch.load(r["model"], weights_only=False)
        assert p["output_block_channels"] == width and p["net_kwargs"]["norm"] == norm.upper()
        seen[width] = _one_voxel_lesion_changes(r["model"], prob, voxels)
    assert seen == {0: [True, False, False, False], 8: [True] * 4}


def test_image_generator_rejects_bad_inputs(cohort, tmp_path):
    with pytest.raises(InputError):
        IG.train_image_generator(cohort["label_paths"], {"t1": cohort["image_paths"]["t1"][:2]}, IMAGE_CFG, tmp_path)
    with pytest.raises(InputError):
        IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], {"bogus_key": 1}, tmp_path)
    with pytest.raises(InputError, match="instance"):
        IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], {"norm": "group"}, tmp_path)
    with pytest.raises(InputError, match="output_block_channels"):
        IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], {"output_block_channels": -1}, tmp_path)


# --------------------------------------------------------------------------- sampling


def test_sample_synthetic_writes_subjects(models, cohort, tmp_path):
    styles = [{"subject": f"sub{i}", "t1": cohort["image_paths"]["t1"][i], "t2": cohort["image_paths"]["t2"][i]}
              for i in range(4)]
    kw = dict(label_vae=models["vae"]["model"], label_ldm=models["ldm"]["model"],
              image_generator=models["img"]["model"], style_subjects=styles, n=3,
              reference=cohort["label_paths"][0], conditioning="unseen", seed=4, steps=3)
    man = S.sample_synthetic(out_dir=tmp_path / "a", **kw)
    assert list(man["subject"]) == ["syn0001", "syn0002", "syn0003"]
    assert {"seed", "dc_wmh", "dc_tumour", "style_t1", "style_t2", "conditioning_mode"} <= set(man.columns)
    assert (man[["dc_wmh", "dc_tumour"]].to_numpy() > 0).all()
    disk = pd.read_csv(tmp_path / "a" / "manifest.tsv", sep="\t")
    assert list(disk["subject"]) == list(man["subject"])
    assert (tmp_path / "a" / "montage.png").stat().st_size > 0
    lab = nib.load(tmp_path / "a" / "samples" / "syn0001" / "label.nii.gz")
    prob = nib.load(tmp_path / "a" / "samples" / "syn0001" / "labelprob.nii.gz").get_fdata(dtype=np.float32)
    assert lab.get_data_dtype() == np.uint8 and lab.shape == SHAPE
    assert prob.shape == SHAPE + (K,) and np.allclose(prob.sum(-1), 1, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), prob.argmax(-1))
    np.testing.assert_allclose(lab.affine, AFFINE)
    for m in ("t1", "t2"):
        assert nib.load(tmp_path / "a" / "samples" / "syn0002" / f"{m}.nii.gz").shape == SHAPE
    # deterministic per seed
    S.sample_synthetic(out_dir=tmp_path / "b", **kw)
    for f in ("samples/syn0003/labelprob.nii.gz", "samples/syn0003/t2.nii.gz"):
        np.testing.assert_array_equal(nib.load(tmp_path / "a" / f).get_fdata(),
                                      nib.load(tmp_path / "b" / f).get_fdata())
    pd.testing.assert_frame_equal(man, pd.read_csv(tmp_path / "b" / "manifest.tsv", sep="\t"))


def test_unrequested_lesion_types_are_removed_by_the_request():
    # 4 voxels, classes 0..9 (6 wmh; 7-9 tumour); map 0 asks WMH only and holds an oedema voxel
    # beside its WMH, map 1 asks nothing, map 2 asks both
    schema = LabelSchema()
    p = np.full((3, K, 4), 0.01, np.float32)
    p[:, 3, :] = 0.2                                    # white matter second everywhere
    p[0, 6, 0], p[0, 8, 1], p[0, 2, 2], p[0, 3, 3] = 0.9, 0.8, 0.9, 0.9
    p[1, 7, 0], p[1, 6, 1], p[1, 1, 2], p[1, 3, 3] = 0.9, 0.9, 0.9, 0.9
    p[2, 6, 0], p[2, 9, 1], p[2, 2, 2], p[2, 3, 3] = 0.9, 0.9, 0.9, 0.9
    p /= p.sum(1, keepdims=True)
    cond = np.array([[0.4, 0.0], [0.0, 0.0], [0.5, 0.6]], np.float32)
    out, leaked = LG.resolve_unrequested_lesions(p, cond, ["wmh", "tumour"], schema, "remove")
    np.testing.assert_array_equal(leaked, [1, 2, 0])
    np.testing.assert_array_equal(out.argmax(1), [[6, 3, 2, 3], [3, 3, 1, 3], [6, 9, 2, 3]])
    assert (out[0, 7:] == 0).all() and (out[1, 6:] == 0).all()
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(out[2], p[2])             # nothing unrequested: unchanged
    assert out[0, 6, 0] > p[0, 6, 0]                     # renormalised, order kept
    kept, leaked_kept = LG.resolve_unrequested_lesions(p, cond, ["wmh", "tumour"], schema, "keep")
    np.testing.assert_array_equal(kept, p)
    np.testing.assert_array_equal(leaked_kept, leaked)
    # the same removal on logits (what the sampling fit works on): the same argmaxes, a copy
    logits = torch.log(torch.from_numpy(p)) + 0.7
    removed = LG.remove_unrequested_logits(logits, cond, ["wmh", "tumour"], schema, "remove")
    np.testing.assert_array_equal(removed.argmax(1).numpy(), out.argmax(1))
    assert torch.isinf(removed[0, 7:]).all() and torch.isinf(removed[1, 6:]).all() and torch.isfinite(removed[2]).all()
    assert torch.isfinite(logits).all()
    assert LG.remove_unrequested_logits(logits, cond, ["wmh", "tumour"], schema, "keep") is logits
    # all of a voxel's probability on removed classes: it becomes background
    one_hot = np.zeros((1, K, 2), np.float32)
    one_hot[0, 8, 0] = one_hot[0, 3, 1] = 1
    out, _ = LG.resolve_unrequested_lesions(one_hot, [[0.0, 0.0]], ["wmh", "tumour"], schema, "remove")
    np.testing.assert_array_equal(out.argmax(1), [[0, 3]])
    np.testing.assert_allclose(out.sum(1), 1)
    with pytest.raises(InputError, match="unrequested_lesions"):
        LG.resolve_unrequested_lesions(p, cond, ["wmh", "tumour"], schema, "drop")
    with pytest.raises(InputError, match="ms_lesion"):
        LG.resolve_unrequested_lesions(p, cond, ["wmh", "ms_lesion"], schema, "remove")


OEDEMA_OFFSET = 3.0  # 603 of the 3 maps' 15360 voxels oedema


def test_sample_synthetic_removes_unrequested_lesion_types(models, cohort, tmp_path):
    # healthy requests: with keep the decoded lesion voxels stay in the samples, with remove none
    # is left, the manifest counts them either way, and the images are drawn from the maps as
    # written. The toy decoder draws no lesion for a healthy request; a class offset on oedema
    # (the calibration's logit offsets) makes it leak some, as the demo's draws oedema specks
    calibration = tmp_path / "oedema_offset.json"
    calibration.write_text(json.dumps({"class_offsets": [0.0] * 8 + [OEDEMA_OFFSET, 0.0]}))
    styles = [{"subject": f"sub{i}", "t1": cohort["image_paths"]["t1"][i], "t2": cohort["image_paths"]["t2"][i]}
              for i in range(2)]
    kw = dict(label_vae=models["vae"]["model"], label_ldm=models["ldm"]["model"],
              image_generator=models["img"]["model"], style_subjects=styles, n=3, montage=False,
              reference=cohort["label_paths"][0], conditioning="healthy", seed=2, label_calibration=calibration)
    lesion = LabelSchema().lesion_type_values["wmh"] + LabelSchema().lesion_type_values["tumour"]
    read = lambda d, i, f: np.asarray(nib.load(tmp_path / d / "samples" / f"syn000{i + 1}" / f).dataobj)  # noqa: E731
    kept = S.sample_synthetic(out_dir=tmp_path / "keep", sampling={"inference_steps": 3, "unrequested_lesions": "keep"},
                              **kw)
    removed = S.sample_synthetic(out_dir=tmp_path / "remove",
                                 sampling={"inference_steps": 3, "unrequested_lesions": "remove"}, **kw)
    counts = [int(np.isin(read("keep", i, "label.nii.gz"), lesion).sum()) for i in range(3)]
    assert 0 < sum(counts) < 3 * np.prod(SHAPE) / 10, "no or too many oedema voxels: nothing to test"
    assert list(kept["unrequested_lesion_voxels"]) == counts == list(removed["unrequested_lesion_voxels"])
    for i in range(3):
        hard = read("remove", i, "label.nii.gz")
        assert not np.isin(hard, lesion).any()
        before = read("keep", i, "label.nii.gz")
        np.testing.assert_array_equal(hard[~np.isin(before, lesion)], before[~np.isin(before, lesion)])
        assert (read("remove", i, "labelprob.nii.gz")[..., lesion] == 0).all()
    assert (read("keep", 0, "t1.nii.gz") != read("remove", 0, "t1.nii.gz")).any() == (counts[0] > 0)
    with pytest.raises(InputError, match="unrequested_lesions"):
        S.sample_synthetic(out_dir=tmp_path / "bad", sampling={"unrequested_lesions": "drop"}, **kw)


def test_sample_synthetic_uses_the_configured_sampling(models, cohort, tmp_path, monkeypatch):
    # the rule passes label_generator.sampling (guidance, composition, ...) to the sampler; it
    # once passed only scheduler and steps, and the arms were sampled at another guidance than
    # the audit's. DDIM eta > 0 is among the settings so that the two runs differ whatever the
    # toy model reads of its context (composition alone moves its maps by ~1e-6, thread-dependent)
    styles = [{"subject": f"sub{i}", "t1": cohort["image_paths"]["t1"][i], "t2": cohort["image_paths"]["t2"][i]}
              for i in range(2)]
    kw = dict(label_vae=models["vae"]["model"], label_ldm=models["ldm"]["model"],
              image_generator=models["img"]["model"], style_subjects=styles, n=2, montage=False,
              reference=cohort["label_paths"][0], conditioning="unseen", seed=4)
    composed = {"inference_steps": 3, "compose_lesion_types": True, "ddim_eta": 1.0}
    passed, original = [], S.sample_labels
    monkeypatch.setattr(S, "sample_labels", lambda *a, **k: passed.append(k["sampling"]) or original(*a, **k))
    man = S.sample_synthetic(out_dir=tmp_path / "composed", sampling=composed, **kw)
    assert passed == [composed]
    S.sample_synthetic(out_dir=tmp_path / "joint", sampling={"inference_steps": 3}, **kw)
    cond = man[["dc_wmh", "dc_tumour"]].to_numpy(np.float32)
    direct = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=4, sampling=composed)
    read = lambda d, i: nib.load(tmp_path / d / "samples" / f"syn000{i + 1}" / "labelprob.nii.gz").get_fdata()  # noqa: E731
    for i in range(2):
        np.testing.assert_allclose(read("composed", i), np.moveaxis(direct[i], 0, -1), atol=1e-6)
    assert np.abs(read("composed", 0) - read("joint", 0)).max() > 1e-3


def test_composed_guidance_sums_what_each_lesion_type_adds():
    # a U-Net of the demo's kind with random weights (a trained toy one barely reads its context)
    unet = LG.build_unet(LG._unet_kwargs(LG.resolve_config(_cfg(LABEL_CFG, ldm={"condition_channels": True})), 2, 2)).eval()
    g = torch.Generator().manual_seed(0)
    for p in unet.parameters():
        p.data = 0.2 * torch.randn(p.shape, generator=g)
    cond = np.array([[0.4, 0.7], [0.0, 0.5], [0.3, 0.0], [0.0, 0.0]], np.float32)
    contexts = LG.composed_contexts(cond)
    assert [c.shape for c in contexts] == [(4, 1, 3)] * 4
    np.testing.assert_array_equal(contexts[0].numpy(), 0)                         # null
    np.testing.assert_array_equal(contexts[1][:, 0].numpy(), [[0, 0, 1]] * 4)       # healthy
    np.testing.assert_array_equal(contexts[2][:, 0, :2].numpy(), np.stack([cond[:, 0], 0 * cond[:, 1]], 1))  # wmh alone
    np.testing.assert_array_equal(contexts[3][:, 0, :2].numpy(), np.stack([0 * cond[:, 0], cond[:, 1]], 1))  # tumour
    x = torch.randn((4, 2, 4, 4, 4), generator=g)
    tt = torch.full((4,), 20, dtype=torch.long)
    w = 2.5
    with torch.no_grad():
        pred = LG._composed_prediction(unet, x, tt, contexts, cond, w, True, "cpu")
        eps = lambda ctx: unet(x=LG.with_condition_channels(x, ctx, True), timesteps=tt, context=ctx)  # noqa: E731
        null, healthy = eps(contexts[0]), eps(contexts[1])
        plain = null + w * (eps(LG.condition_context(cond)) - null)
        both = null + w * (healthy + (eps(contexts[2]) - healthy) + (eps(contexts[3]) - healthy) - null)
    scale = float(plain.abs().max())
    np.testing.assert_allclose(pred[1:].numpy(), plain[1:].numpy(), atol=1e-5 * scale)   # one type or none: plain
    np.testing.assert_allclose(pred[0].numpy(), both[0].numpy(), atol=1e-5 * scale)
    assert float((pred[0] - plain[0]).abs().max()) > 1e-2 * scale


def test_compose_weight_scales_each_lesion_type_term():
    unet = LG.build_unet(LG._unet_kwargs(LG.resolve_config(_cfg(LABEL_CFG, ldm={"condition_channels": True})), 2, 2)).eval()
    g = torch.Generator().manual_seed(2)
    for p in unet.parameters():
        p.data = 0.2 * torch.randn(p.shape, generator=g)
    np.testing.assert_allclose(LG.compose_weights(1.0, ["wmh", "tumour"]), [1, 1])
    weights = LG.compose_weights({"wmh": 1.5}, ["wmh", "tumour"])
    np.testing.assert_allclose(weights, [1.5, 1.0])                      # a type left out keeps 1
    cond = np.array([[0.4, 0.7], [0.3, 0.0]], np.float32)
    contexts = LG.composed_contexts(cond)
    x = torch.randn((2, 2, 4, 4, 4), generator=g)
    tt = torch.full((2,), 20, dtype=torch.long)
    w = 3.0
    with torch.no_grad():
        pred = LG._composed_prediction(unet, x, tt, contexts, cond, w, True, "cpu", weights=weights)
        ones = LG._composed_prediction(unet, x, tt, contexts, cond, w, True, "cpu")
        eps = lambda ctx: unet(x=LG.with_condition_channels(x, ctx, True), timesteps=tt, context=ctx)  # noqa: E731
        null, healthy, wmh, tumour = (eps(c) for c in contexts)
        want = null + w * (healthy + 1.5 * (wmh - healthy) + (tumour - healthy) - null)
    scale = float(want.abs().max())
    np.testing.assert_allclose(pred.numpy(), want.numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(ones.numpy(), (null + w * (healthy + (wmh - healthy) + (tumour - healthy)
                                                         - null)).numpy(), atol=1e-5 * scale)
    assert float((pred - ones).abs().max()) > 1e-2 * scale
    for bad, text in (({"lesion": 2.0}, "lesion types ['lesion']"), ({"wmh": 0}, "number > 0"), (-1, "number > 0")):
        with pytest.raises(InputError, match=re.escape(text)) as err:
            LG.compose_weights(bad, ["wmh", "tumour"])
        assert err.value.field == "label_generator.sampling.compose_weight"


def test_compose_weight_search_meets_the_target_volume():
    """compose_fit.search_weight: weights tried by factors of 1.5 from 1 towards the target volume,
    then the linear interpolation between the two that bracket it (exact for a linear response)."""
    from brainsynth.generators.brainspade import compose_fit as CF
    k, trace = CF.search_weight(lambda k: 50 * k, 152)  # composed volume a third of the target at 1
    assert [round(w, 4) for w, _ in trace] == [1, 1.5, 2.25, 3.375] and k == pytest.approx(3.04)
    k, trace = CF.search_weight(lambda k: 100 * k, 40)  # too large at 1: down
    assert [round(w, 4) for w, _ in trace] == [1, 0.6667, 0.4444, 0.2963] and k == pytest.approx(0.4)
    k, trace = CF.search_weight(lambda k: 10.0, 100)  # a model deaf to the weight: the range ends, 1 kept
    assert [round(w, 4) for w, _ in trace] == [1, 1.5, 2.25, 3.375] and k == 1.0
    assert CF.search_weight(lambda k: 7.0, 7.0) == (1.0, [(1.0, 7.0)])
    assert CF.fitted_weight([(1, 10.0), (1.5, 20.0)], 50) == 1.5  # not reached: the closest tried


def test_fitted_compose_weights_are_what_sampling_draws(models, tmp_path):
    """fit_compose_weights records the volumes the sampler gives (each type alone, and composed at
    each weight tried), and a sampling config saying fit samples with the fitted weights."""
    from brainsynth.generators.brainspade import compose_fit as CF
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    samp = {"inference_steps": 3, "compose_lesion_types": True}
    # the toy LDM draws no lesions; its lesion types are counted on classes it does draw, so that
    # the search runs (the volumes are the sampler's either way)
    schema = LabelSchema(lesion_types={"wmh": ["gm"], "tumour": ["wm"]})
    rec = CF.fit_compose_weights(vae, ldm, tmp_path / "w.json", sampling=samp, schema=schema, device="cpu",
                                 n_requests=3)
    assert json.loads((tmp_path / "w.json").read_text()) == json.loads(json.dumps(rec))
    types, tv = LG.training_conditioning(ldm)
    assert list(rec["compose_weight"]) == types == ["wmh", "tumour"]
    requests = LG.make_conditioning("unseen", 3, types, tv, seed=CF.FIT_SEED)

    def median(cond, weights, t):
        probs = LG.sample_labels(vae, ldm, cond, seed=CF.FIT_SEED, batch_size=3, device="cpu",
                                 sampling={**samp, "compose_weight": weights})
        return float(np.median([schema.lesion_counts(lab)[t] for lab in probs.argmax(1)]))

    alone = np.zeros_like(requests)
    alone[:, 0] = requests[:, 0]
    wmh = rec["types"]["wmh"]
    assert wmh["alone_median_voxels"] == median(alone, 1.0, "wmh") > 0
    assert wmh["tried"][0]["weight"] == 1.0
    for tried in wmh["tried"]:  # the first type is fitted with the others at 1
        assert tried["median_voxels"] == median(requests, {"wmh": tried["weight"], "tumour": 1.0}, "wmh")
    for info in rec["types"].values():
        assert CF.FIT_RANGE[0] <= info["weight"] <= CF.FIT_RANGE[1]
    fitted = LG.resolve_compose_weight({**samp, "compose_weight": "fit"}, tmp_path / "w.json")
    assert fitted == {**samp, "compose_weight": rec["compose_weight"]}
    np.testing.assert_array_equal(
        LG.sample_labels(vae, ldm, requests, seed=1, sampling=fitted),
        LG.sample_labels(vae, ldm, requests, seed=1, sampling={**samp, "compose_weight": dict(rec["compose_weight"])}))


def test_tissue_offsets_meet_the_target_fractions_by_hand():
    """fit_tissue_offsets on hand-made logits: csf wins where a ramp beats gm's constant logit, a
    quarter of the brain before the fit; the fit moves csf and gm until each holds half the brain,
    leaves background and a class absent from the target at 0."""
    from brainsynth.generators.brainspade import tissue_fit as TF
    logits = torch.zeros(2, 4, 1, 10, 10)
    logits[:, 0, :, :2, :] = 5.0                                   # 20 background voxels per map
    ramp = torch.linspace(0, 1, 80).view(8, 10)
    logits[:, 1, 0, 2:, :] = ramp                                  # csf: k / 79 for the 80 brain voxels
    logits[:, 2, 0, 2:, :] = 0.75                                  # gm: wins where k / 79 <= 0.75
    logits[:, 3] = -5.0                                            # a class no map holds
    assert TF.brain_fractions(logits.argmax(1), [1, 2, 3]) == {1: 0.25, 2: 0.75, 3: 0.0}
    fit = TF.fit_tissue_offsets(logits, {1: 0.5, 2: 0.5, 3: 0.0})
    assert fit["before"] == {1: 0.25, 2: 0.75, 3: 0.0}
    offsets, drawn = fit["offsets"], fit["after"]
    assert abs(drawn[1] - 0.5) <= 1 / 80 and abs(drawn[2] - 0.5) <= 1 / 80
    assert drawn == TF.brain_fractions(LG.with_class_offsets(logits, offsets).argmax(1), [1, 2, 3])
    assert offsets[1] > offsets[2] and offsets[0] == 0 and offsets[3] == 0        # csf gains on gm
    # met at once: no round taken
    fit = TF.fit_tissue_offsets(logits, {1: 0.25, 2: 0.75})
    assert fit["round"] == 0 and not fit["offsets"].any()


def test_sampling_calibration_adds_the_tissue_offsets_sampling_draws(models, cohort, tmp_path):
    """fit_sampling_calibration writes the VAE's calibration with the tissue offsets added, and
    maps sampled with it at the training conditioning hold the fractions the fit recorded."""
    from brainsynth.generators.brainspade import sampling_calibration as SC
    from brainsynth.generators.brainspade import tissue_fit as TF
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    schema = LabelSchema()
    cal = LG.calibrate_label_vae(vae, cohort["label_paths"], "tissue", tmp_path / "vae_cal.json", schema=schema,
                                 device="cpu")
    samp = {"inference_steps": 3}
    rec = SC.fit_sampling_calibration(vae, ldm, tmp_path / "vae_cal.json", cohort["label_paths"], tmp_path / "s.json",
                                     sampling=samp, schema=schema, device="cpu", seed=2)
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(rec))
    assert "deformation" not in rec and rec["tissue_fit"]["maps"] == 4     # one at each training map's conditioning
    assert rec["temperature"] == cal["temperature"]
    tissues = {schema.value(t): t for t in schema.tissues}
    offsets = [cal["class_offsets"][c] + rec["tissue_offsets"].get(n, 0.0) for c, n in
               ((c, {**tissues}.get(c)) for c in range(schema.n_classes))]
    np.testing.assert_allclose(rec["class_offsets"], offsets, atol=1e-5)
    assert rec["tissue_offsets"]["brainstem"] == 0.0                     # no toy brain holds brainstem
    assert any(v != 0 for v in rec["tissue_offsets"].values())
    _, tv = LG.training_conditioning(ldm)
    probs = LG.sample_labels(vae, ldm, np.asarray(tv, np.float32), seed=2, batch_size=4, device="cpu",
                             sampling=samp, calibration=tmp_path / "s.json")
    drawn = TF.brain_fractions(probs.argmax(1), tissues)
    for c, t in tissues.items():
        assert drawn[c] == pytest.approx(rec["tissue_fit"][f"{t}_after"], abs=2e-3), t
    truth = np.stack([lab for lab in cohort["labels"]])
    assert rec["tissue_fit"]["csf_training"] == pytest.approx(TF.brain_fractions(truth, [1])[1], abs=1e-6)


def test_deformation_warp_moves_maps_along_the_right_axes_and_fields_are_seeded_per_map():
    """A constant displacement of one voxel along an axis samples each voxel's next neighbour on
    that axis (hand case, on a grid of three different sizes), a fraction of a voxel the nearest
    voxel's value; the fields depend on (seed, index)
    alone and scale with their standard deviation; a size of 0 leaves the maps as they are."""
    from brainsynth.generators.brainspade import deformation as D
    maps = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).view(2, 4, 5, 6)
    for axis in range(3):
        disp = torch.zeros(3, 4, 5, 6)
        disp[axis] = 1.0
        moved = D.warp(maps, disp)
        inner = [slice(None)] * 4
        inner[axis + 1] = slice(0, -1)
        ahead = [slice(None)] * 4
        ahead[axis + 1] = slice(1, None)
        torch.testing.assert_close(moved[tuple(inner)], maps[tuple(ahead)])
        last = [slice(None)] * 4
        last[axis + 1] = slice(-1, None)
        torch.testing.assert_close(moved[tuple(last)], maps[tuple(last)])      # the border beyond the grid
    # between voxels the nearest one's value, never a blend: a one-voxel structure keeps its value
    # and its single voxel (linear interpolation would spread it at a fraction over eight)
    spike = torch.zeros(1, 6, 6, 6)
    spike[0, 2, 3, 3] = 5.0
    moved = D.warp(spike, torch.tensor([0.4, -0.3, 0.2]).view(3, 1, 1, 1).expand(3, 6, 6, 6))
    assert set(moved.unique().tolist()) == {0.0, 5.0} and (moved == 5.0).sum() == 1 and moved[0, 2, 3, 3] == 5.0
    moved = D.warp(spike, torch.tensor([0.6, 0.0, 0.0]).view(3, 1, 1, 1).expand(3, 6, 6, 6))
    assert moved[0, 1, 3, 3] == 5.0 and (moved == 5.0).sum() == 1
    a, b = D.unit_field((8, 9, 10), 4.0, 3, 1), D.unit_field((8, 9, 10), 4.0, 3, 1)
    assert a.shape == (3, 8, 9, 10) and torch.equal(a, b)
    assert not torch.equal(a, D.unit_field((8, 9, 10), 4.0, 3, 2)) and not torch.equal(a, D.unit_field((8, 9, 10), 4.0, 4, 1))
    torch.testing.assert_close(D.unit_field((8, 9, 10), 2.0, 3, 1).abs().max(), 2 * a.abs().max(), rtol=0.5, atol=0)
    batch = torch.randn(3, 4, 8, 9, 10)
    assert D.deform(batch, 0.0, 4.0, 3) is batch
    one_by_one = torch.cat([D.deform(batch[i:i + 1], 2.5, 4.0, 3, first_index=i) for i in range(3)])
    torch.testing.assert_close(D.deform(batch, 2.5, 4.0, 3), one_by_one)


def test_mean_pairwise_dice_by_hand():
    """Per group, the mean over pairs of the mean Dice of the non-background classes either map
    holds; then the mean over groups of two or more maps."""
    from brainsynth.generators.brainspade import deformation as D
    a = np.array([[1, 1, 2, 2]])
    b = np.array([[1, 2, 2, 2]])                                 # vs a: class 1 2/3, class 2 4/5
    c = np.array([[3, 3, 0, 0]])                                 # vs anything else: 0
    hard = np.stack([a, b, a, c, a])
    d = D.mean_pairwise_dice(hard, ["x", "x", "y", "y", "z"], 4)
    assert d == pytest.approx(((2 / 3 + 4 / 5) / 2 + 0.0) / 2)
    with pytest.raises(InputError, match="two or more maps of one phenotype"):
        D.mean_pairwise_dice(hard[:2], ["x", "y"], 4)
    assert D.mean_pairwise_dice(hard, ["x", "x", None, None, "z"], 4) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # the audit's figure (label_quality.pairwise_dice), on random maps; pairs capped per group
    from brainsynth.generators.label_quality import pairwise_dice
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 5, size=(6, 7, 8, 3))
    maps[0][maps[0] == 4] = 0                                     # a class one map lacks
    every = D.mean_pairwise_dice(maps, ["g"] * 6, 5)
    assert every == pairwise_dice(maps, 5)[0]
    assert D.mean_pairwise_dice(maps, ["g"] * 6, 5, max_pairs=15) == every       # 15 pairs: all of them
    assert D.mean_pairwise_dice(maps, ["g"] * 6, 5, max_pairs=4) != every


def test_deformation_fit_meets_the_target_diversity():
    """Maps that are all alike (pairwise Dice 1) are warped until their pairwise Dice is the
    target's; maps already that diverse keep their shape (size 0)."""
    from brainsynth.generators.brainspade import deformation as D
    g = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (12, 12, 12)], indexing="ij"))
    r = ((g - 5.5) ** 2).sum(0).sqrt()
    logits = torch.stack([torch.zeros_like(r), 4.0 - r, torch.full_like(r, -1.0), r - 5.0])  # 1 inside, 3 outside
    maps = logits.expand(6, -1, -1, -1, -1).clone()
    fit = D.fit_deformation(maps, 0.8, ["h"] * 6, 4.0, seed=0)
    assert fit["before"] == 1.0 and 0 < fit["std_mm"] < D.FIT_MAX_MM
    assert fit["after"] == pytest.approx(0.8, abs=0.03)
    warped = D.deform(maps, fit["std_mm"], 4.0, 0).argmax(1)
    assert D.mean_pairwise_dice(warped, ["h"] * 6, 4) == pytest.approx(fit["after"])
    assert D.fit_deformation(maps, 1.0, ["h"] * 6, 4.0, seed=0)["std_mm"] == 0.0


def test_sampling_warps_each_map_by_the_calibrations_deformation(models, tmp_path):
    """A calibration with a deformation: each sampled map is the plain sample's log-probabilities
    warped by its own field (seed, index), whatever the batch size."""
    from brainsynth.generators.brainspade import deformation as D
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    _, tv = LG.training_conditioning(ldm)
    cond = np.asarray(tv, np.float32)
    plain = {"class_offsets": [0.0] * K, "temperature": 1.0}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    (tmp_path / "warped.json").write_text(json.dumps(
        {**plain, "deformation": {"std_mm": 3.0, "spacing_mm": D.CONTROL_SPACING_MM, "interpolation": D.INTERPOLATION,
                                  "voxel_mm": [4.0, 4.0, 4.0]}}))
    samp = {"inference_steps": 3}
    base = LG.sample_labels(vae, ldm, cond, seed=5, batch_size=4, device="cpu", sampling=samp,
                            calibration=tmp_path / "plain.json")
    expected = torch.softmax(D.deform(torch.log(torch.from_numpy(base).clamp_min(1e-30)), 3.0, [4.0] * 3, 5), dim=1)
    for bs in (4, 3):
        warped = LG.sample_labels(vae, ldm, cond, seed=5, batch_size=bs, device="cpu", sampling=samp,
                                  calibration=tmp_path / "warped.json")
        np.testing.assert_allclose(warped, expected.numpy(), atol=2e-4)
    assert (warped.argmax(1) != base.argmax(1)).any()
    # a size per phenotype: the WMH maps' fields at theirs, the rest (tumour) at the record's std_mm
    (tmp_path / "by_phenotype.json").write_text(json.dumps(
        {**plain, "deformation": {"std_mm": 1.5, "std_mm_by_phenotype": {"wmh": 3.0}, "spacing_mm": D.CONTROL_SPACING_MM,
                                  "interpolation": D.INTERPOLATION, "voxel_mm": [4.0, 4.0, 4.0]}}))
    types, _ = LG.training_conditioning(ldm)
    stds = [3.0 if row[types.index("wmh")] > 0 and row[types.index("tumour")] == 0 else 1.5 for row in cond]
    assert 1.5 in stds and 3.0 in stds
    expected = torch.cat([torch.softmax(D.deform(torch.log(torch.from_numpy(base[i:i + 1]).clamp_min(1e-30)), s,
                                                 [4.0] * 3, 5, first_index=i), dim=1) for i, s in enumerate(stds)])
    np.testing.assert_allclose(LG.sample_labels(vae, ldm, cond, seed=5, batch_size=3, device="cpu", sampling=samp,
                                                calibration=tmp_path / "by_phenotype.json"), expected.numpy(), atol=2e-4)
    # another control spacing, a fit of the linear warp (no interpolation recorded), a negative size: refused
    for other in ({"spacing_mm": 10.0, "interpolation": D.INTERPOLATION}, {"spacing_mm": D.CONTROL_SPACING_MM},
                  {"spacing_mm": D.CONTROL_SPACING_MM, "interpolation": D.INTERPOLATION,
                   "std_mm_by_phenotype": {"wmh": -1.0}}):
        (tmp_path / "other.json").write_text(json.dumps({**plain, "deformation": {"std_mm": 3.0, "voxel_mm": [4.0] * 3,
                                                                                  **other}}))
        with pytest.raises(InputError, match="not one this version draws"):
            LG.sample_labels(vae, ldm, cond, seed=5, device="cpu", sampling=samp, calibration=tmp_path / "other.json")


def test_sampling_calibration_fits_the_deformation_before_the_tissue_offsets(models, cohort, tmp_path):
    """deformation and tissue offsets fitted together: the record holds the deformation's size and
    the pairwise Dice it reached, and maps sampled with the record at the fit's seed hold the
    pairwise Dice and tissue fractions the fit recorded."""
    from brainsynth.generators.brainspade import deformation as D
    from brainsynth.generators.brainspade import sampling_calibration as SC
    from brainsynth.generators.brainspade import tissue_fit as TF
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    schema = LabelSchema()
    LG.calibrate_label_vae(vae, cohort["label_paths"], "tissue", tmp_path / "vae_cal.json", schema=schema, device="cpu")
    # oedema pushed up: the WMH maps draw some, which sampling removes (unrequested_lesions)
    vae_cal = json.loads((tmp_path / "vae_cal.json").read_text())
    vae_cal["class_offsets"][8] += OEDEMA_OFFSET
    (tmp_path / "vae_cal.json").write_text(json.dumps(vae_cal))
    samp = {"inference_steps": 3, "unrequested_lesions": "remove"}
    rec = SC.fit_sampling_calibration(vae, ldm, tmp_path / "vae_cal.json", cohort["label_paths"], tmp_path / "s.json",
                                      deformation=True, sampling=samp, schema=schema, device="cpu", seed=2)
    d = rec["deformation"]
    # two maps at each of the 4 training maps' conditioning
    assert d["voxel_mm"] == [4.0, 4.0, 4.0] and d["maps"] == 8 and d["spacing_mm"] == D.CONTROL_SPACING_MM
    assert d["interpolation"] == "nearest"
    assert d["grouping"] == "phenotype"
    # one size per phenotype; the record's std_mm, for phenotypes without training maps, none
    assert set(d["std_mm_by_phenotype"]) == {"tumour", "wmh"} and d["std_mm"] == 0.0
    groups = ["tumour", "wmh", "tumour", "wmh"]                   # _brain: even maps tumour, odd maps WMH
    assert d["pairwise_dice_training"] == pytest.approx(D.mean_pairwise_dice(np.stack(cohort["labels"]), groups, K))
    _, tv = LG.training_conditioning(ldm)
    tv = np.repeat(np.asarray(tv, np.float32), 2, axis=0)
    probs = LG.sample_labels(vae, ldm, tv, seed=2, batch_size=4, device="cpu",
                             sampling=samp, calibration=tmp_path / "s.json")
    # the maps as the samples carry them: the fit judged them with unrequested lesion types removed
    probs, leaked = LG.resolve_unrequested_lesions(probs, tv, ["wmh", "tumour"], schema, "remove")
    assert leaked.any()  # the tiny decoder draws some: the removal is exercised
    assert D.mean_pairwise_dice(probs.argmax(1), [D.phenotype({"wmh": a > 0, "tumour": b > 0}) for a, b in tv],
                                K) == pytest.approx(d["pairwise_dice_after"], abs=2e-3)
    tissues = {schema.value(t): t for t in schema.tissues}
    drawn = TF.brain_fractions(probs.argmax(1), tissues)
    for c, t in tissues.items():
        assert drawn[c] == pytest.approx(rec["tissue_fit"][f"{t}_after"], abs=2e-3), t


def test_sampling_calibration_draws_at_most_its_cap_of_maps(models, cohort, tmp_path, monkeypatch):
    """On a cohort larger than the fit's cap it draws the cap's number of maps, at the conditioning
    of as many training maps (seeded), and still compares them with every training map."""
    from brainsynth.generators.brainspade import sampling_calibration as SC
    vae, ldm = models["vae"]["model"], models["ldm"]["model"]
    monkeypatch.setattr(SC, "FIT_MAX_MAPS", 3)
    rec = SC.fit_sampling_calibration(vae, ldm, None, cohort["label_paths"], tmp_path / "s.json", deformation=True,
                                      sampling={"inference_steps": 2}, device="cpu", seed=2)
    assert rec["tissue_fit"]["maps"] == 3 and rec["deformation"]["maps"] == 3
    # 3 of the 2 + 2 maps of two phenotypes: one phenotype drawn twice, the fit within it; the
    # phenotype drawn once is not warped
    assert rec["deformation"]["grouping"] == "phenotype"
    assert len(rec["deformation"]["std_mm_by_phenotype"]) == 1 and rec["deformation"]["std_mm"] == 0.0
    monkeypatch.setattr(SC, "FIT_MAX_MAPS", 2)
    rec = SC.fit_sampling_calibration(vae, ldm, None, cohort["label_paths"], tmp_path / "s.json", deformation=True,
                                      sampling={"inference_steps": 2}, device="cpu", seed=0)
    # seed 0 keeps maps 2 and 3 (a tumour and a WMH map): no phenotype twice, all maps one group
    assert list(np.sort(np.random.default_rng(0).choice(4, 2, replace=False))) == [2, 3]
    assert rec["deformation"]["grouping"] == "pooled" and rec["deformation"]["std_mm_by_phenotype"] == {}
    assert rec["tissue_fit"]["csf_training"] == pytest.approx(
        np.mean([(lab == 1).sum() / (lab > 0).sum() for lab in cohort["labels"]]), abs=1e-6)


def test_compose_weight_fit_needs_its_fitted_file(tmp_path):
    from brainsynth.generators.brainspade import settings
    assert LG.resolve_compose_weight({"compose_weight": 2}, None) == {"compose_weight": 2}  # given: kept
    with pytest.raises(InputError, match="no fitted weights") as err:
        LG.resolve_compose_weight({"compose_weight": "fit"}, None)
    assert err.value.field == "label_generator.sampling.compose_weight" and "fit_compose_weight" in err.value.fix
    (tmp_path / "cut.json").write_text('{"compose_weight": {"wmh"')  # a half-written file
    with pytest.raises(InputError, match="cannot read") as err:
        LG.resolve_compose_weight({"compose_weight": "fit"}, tmp_path / "cut.json")
    assert err.value.file == tmp_path / "cut.json"
    with pytest.raises(InputError, match="without the fitted weights"):
        LG.compose_weights("fit", ["wmh", "tumour"])
    fit = {"sampling": {"compose_weight": "fit", "compose_lesion_types": True, "guidance_scale": 3.0}}
    settings.check_settings(fit, ["wmh", "tumour"])
    assert settings.fits_compose_weight(fit, ["wmh", "tumour"])
    assert settings.sampling_settings(fit, ["wmh", "tumour"]) == fit["sampling"]  # resolved by the sampler
    # nothing to compose (composition off, or one lesion type): nothing fitted, the plain weight 1
    off = {"sampling": {**fit["sampling"], "compose_lesion_types": False}}
    for cfg, types in ((off, ["wmh", "tumour"]), (fit, ["wmh"])):
        settings.check_settings(cfg, types)
        assert not settings.fits_compose_weight(cfg, types)
        assert settings.sampling_settings(cfg, types) == {**cfg["sampling"], "compose_weight": 1.0}
    assert not settings.fits_compose_weight({"sampling": {"compose_weight": 2, "compose_lesion_types": True}},
                                            ["wmh", "tumour"])


def test_lesion_type_settings_checked_without_torch():
    """settings.check_settings: what the workflow checks at its start (the lesion types of the
    label schema), with the defaults of the types a mapping leaves out."""
    from brainsynth.generators.brainspade import settings
    types = ["wmh", "tumour"]
    assert settings.loss_weights({"wmh": 10}, types) == {"wmh": 10.0, "tumour": 0.0}
    assert settings.compose_weights(2, types) == {"wmh": 2.0, "tumour": 2.0}
    settings.check_settings({"ldm": {"lesion_weight": 0}, "sampling": {"compose_weight": {"tumour": 0.5}}}, types)
    settings.check_settings({}, types)
    for cfg, field in (({"ldm": {"lesion_weight": {"tumor": 1}}}, "label_generator.ldm.lesion_weight"),
                       ({"sampling": {"compose_weight": 0}}, "label_generator.sampling.compose_weight"),
                       ({"sampling": {"compose_weight": {"wmh": "2"}}}, "label_generator.sampling.compose_weight")):
        with pytest.raises(InputError) as err:
            settings.check_settings(cfg, types)
        assert err.value.field == field and err.value.fix


def test_negation_subtracts_each_lesion_type_not_asked_for():
    unet = LG.build_unet(LG._unet_kwargs(LG.resolve_config(_cfg(LABEL_CFG, ldm={"condition_channels": True})), 2, 2)).eval()
    g = torch.Generator().manual_seed(1)
    for p in unet.parameters():
        p.data = 0.2 * torch.randn(p.shape, generator=g)
    typical = LG.typical_lesion_values(np.array([[0, 0], [0.2, 0], [0.6, 0], [0.4, 0], [0, 0.9]], np.float32))
    np.testing.assert_allclose(typical, [0.4, 0.9])                     # median of the maps holding each type
    np.testing.assert_allclose(LG.typical_lesion_values(np.zeros((3, 2))), [0.5, 0.5])
    cond = np.array([[0.4, 0.7], [0.0, 0.5], [0.3, 0.0], [0.0, 0.0]], np.float32)
    contexts = LG.composed_contexts(cond, typical)
    np.testing.assert_allclose(contexts[2][:, 0, :2].numpy(), [[0.4, 0], [0.4, 0], [0.3, 0], [0.4, 0]])
    np.testing.assert_allclose(contexts[3][:, 0, :2].numpy(), [[0, 0.7], [0, 0.5], [0, 0.9], [0, 0.9]])
    x = torch.randn((4, 2, 4, 4, 4), generator=g)
    tt = torch.full((4,), 20, dtype=torch.long)
    w = 2.0
    with torch.no_grad():
        pred = LG._composed_prediction(unet, x, tt, contexts, cond, w, True, "cpu", negate=True)
        composed = LG._composed_prediction(unet, x, tt, LG.composed_contexts(cond), cond, w, True, "cpu")
        null, healthy, wmh, tumour = (unet(x=LG.with_condition_channels(x, c, True), timesteps=tt, context=c)
                                      for c in contexts)
    by_hand = [null + w * (healthy + (wmh - healthy) + (tumour - healthy) - null),   # both asked: nothing negated
               null + w * (healthy - (wmh - healthy) + (tumour - healthy) - null),   # tumour, not WMH
               null + w * (healthy + (wmh - healthy) - (tumour - healthy) - null),   # WMH, not tumour
               null + w * (healthy - (wmh - healthy) - (tumour - healthy) - null)]   # healthy: neither
    scale = float(pred.abs().max())
    for i in range(4):
        np.testing.assert_allclose(pred[i].numpy(), by_hand[i][i].numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(pred[0].numpy(), composed[0].numpy(), atol=1e-5 * scale)
    for i in range(1, 4):
        assert float((pred[i] - composed[i]).abs().max()) > 1e-2 * scale


def test_negated_sampling_is_deterministic_and_differs(models):
    cond = np.array([[0.0, 0.0], [0.5, 0.0]], np.float32)
    neg = {"inference_steps": 3, "negate_unrequested": True}
    a = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=2, sampling=neg)
    b = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=2, sampling=neg)
    plain = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=2,
                             sampling={"inference_steps": 3})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-4)
    assert not np.allclose(a, plain)


def test_posterior_sigma_init_sets_the_starting_sigma(cohort, tmp_path):
    vae = LG.build_vae(LG._vae_kwargs(LG.resolve_config(LABEL_CFG), K))
    LG.init_posterior_sigma(vae, 0.1)
    with torch.no_grad():
        _, sigma = vae.encode(torch.rand((1, K, 8, 8, 8)))
    np.testing.assert_allclose(sigma.numpy(), 0.1, rtol=1e-5)
    with pytest.raises(InputError, match="posterior_sigma_init"):
        LG.init_posterior_sigma(vae, 0.0)
    cfg = _cfg(LABEL_CFG, vae={"posterior_sigma_init": 0.1, "steps": 3})
    out = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path)
    vae2, _ = LG.load_vae(out["model"])
    data, _, _ = LG._training_maps(cohort["label_paths"][:1], 3, K)
    with torch.no_grad():
        _, sigma2 = vae2.encode(C.pad_background(data, C.divisible_shape(SHAPE, 2)).float())
    assert float(sigma2.mean()) < 0.2   # MONAI's initialisation: about 1


def test_restyle_synthetic_keeps_labels_and_changes_styles(models, cohort, tmp_path):
    styles = [{"subject": f"sub{i}", "t1": cohort["image_paths"]["t1"][i], "t2": cohort["image_paths"]["t2"][i]}
              for i in range(4)]
    S.sample_synthetic(label_vae=models["vae"]["model"], label_ldm=models["ldm"]["model"],
                       image_generator=models["img"]["model"], style_subjects=styles[:2], n=2,
                       reference=cohort["label_paths"][0], seed=4, steps=3, out_dir=tmp_path / "base")
    # other styles: brighter versions of subjects 2 and 3 (a "site" with another contrast)
    shifted = []
    for i in (2, 3):
        row = {"subject": f"far{i}"}
        for m in ("t1", "t2"):
            img = nib.load(cohort["image_paths"][m][i])
            p = tmp_path / f"far{i}_{m}.nii.gz"
            nib.save(nib.Nifti1Image(np.clip(img.get_fdata(dtype=np.float32) * 1.8, 0, 1), img.affine), p)
            row[m] = str(p)
        shifted.append(row)
    kw = dict(image_generator=models["img"]["model"], samples_dir=tmp_path / "base" / "samples",
              subjects=["syn0001", "syn0002"], style_subjects=shifted, reference=cohort["label_paths"][0], seed=4)
    man = S.restyle_synthetic(out_dir=tmp_path / "far", **kw)
    assert list(man["subject"]) == ["syn0001", "syn0002"]
    assert set(man["style_t1"]) <= {"far2", "far3"} and set(man["style_t2"]) <= {"far2", "far3"}
    assert (tmp_path / "far" / "montage.png").stat().st_size > 0
    assert not (tmp_path / "far" / "samples" / "syn0001" / "label.nii.gz").exists()  # labels stay in the base set
    for sid in ("syn0001", "syn0002"):
        base = nib.load(tmp_path / "base" / "samples" / sid / "t1.nii.gz")
        far = nib.load(tmp_path / "far" / "samples" / sid / "t1.nii.gz")
        assert far.shape == base.shape and np.allclose(far.affine, base.affine)
        assert not np.array_equal(far.get_fdata(), base.get_fdata())
    # deterministic per seed
    S.restyle_synthetic(out_dir=tmp_path / "again", **kw)
    np.testing.assert_array_equal(nib.load(tmp_path / "far" / "samples" / "syn0002" / "t2.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "again" / "samples" / "syn0002" / "t2.nii.gz").get_fdata())
    # a missing label map is named
    with pytest.raises(InputError, match="syn0009"):
        S.restyle_synthetic(out_dir=tmp_path / "bad", **{**kw, "subjects": ["syn0009"]})


# --------------------------------------------------------------------------- quality


def test_mmd_identical_vs_shifted():
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 1, (6, 12, 12, 12)).astype(np.float32)
    same = Q.mmd(real, real.copy())
    assert same["mmd_biased"] == pytest.approx(0.0, abs=1e-9)
    assert Q.mmd(real, real[::-1].copy())["mmd"] == pytest.approx(same["mmd"], abs=1e-6)  # order-free
    other = rng.uniform(0, 1, (6, 12, 12, 12)).astype(np.float32)  # same distribution, independent
    shifted = Q.mmd(real, np.clip(other + 0.3, 0, 1.5))
    assert abs(Q.mmd(real, other)["mmd"]) < 0.02 * shifted["mmd"]
    assert shifted["mmd_biased"] > 0.05 and shifted["n_per_set"] == 6


def test_nearest_real_flags_near_copies():
    rng = np.random.default_rng(1)
    base = np.zeros((5, 16, 16, 16), np.float32)
    for i in range(5):
        base[i] = rng.uniform(0, 1, (16, 16, 16)) * (np.arange(16) < 8 + i)[None, None, :]
    copy = np.clip(base[2] + rng.normal(0, 0.005, base[2].shape), 0, 1).astype(np.float32)
    novel = rng.uniform(0, 1, (16, 16, 16)).astype(np.float32)
    df = Q.nearest_real(np.stack([copy, novel]), base, "ssim", 0.95, ["copy", "novel"],
                        [f"r{i}" for i in range(5)])
    assert df.loc[0, "nearest_real"] == "r2" and bool(df.loc[0, "near_copy"])
    assert not bool(df.loc[1, "near_copy"])
    pre = Q.nearest_real(np.stack([copy, novel]), base, "ssim", 0.95, candidates=2)  # MSE prefilter
    assert pre.loc[0, "nearest_real"] == "real_2" and list(pre["near_copy"]) == [True, False]
    mse = Q.nearest_real(np.stack([copy, novel]), base, "mse")
    assert list(mse["near_copy"]) == [True, False]
    labs = np.stack([_brain(i, np.random.default_rng(i)) for i in range(3)])
    dice = Q.nearest_real(labs[1:2], labs, "dice", n_classes=K)
    assert dice.loc[0, "nearest_real"] == "real_1" and dice.loc[0, "similarity"] == pytest.approx(1.0)


def test_ms_ssim_diversity_and_params():
    k, w = Q.ms_ssim_params((48, 56, 48))
    assert k >= 5 and len(w) >= 3 and sum(w) == pytest.approx(1.0)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (1, 16, 20, 16)).astype(np.float32)
    same = Q.ms_ssim_diversity(np.repeat(x, 3, 0))
    assert same["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4) and same["n_pairs"] == 3
    diverse = Q.ms_ssim_diversity(rng.uniform(0, 1, (4, 16, 20, 16)).astype(np.float32))
    assert diverse["ms_ssim_mean"] < 0.5


def test_volume_fractions_vs_training(cohort):
    names = LG.LabelSchema().names
    hard = np.zeros((2, 4, 4, 4), np.uint8)
    hard[0, :2] = 2          # 32 voxels gm
    hard[0, 2, :2] = 6       # 8 voxels wmh
    hard[1, :1] = 3          # 16 voxels wm
    prob = np.stack([np.eye(K, dtype=np.float32)[h] for h in hard]).transpose(0, 4, 1, 2, 3)
    vf = Q.volume_fractions_vs_training(prob, hard, names)
    assert vf.synthetic.loc[0, "gm"] == pytest.approx(0.8) and vf.synthetic.loc[0, "wmh"] == pytest.approx(0.2)
    assert vf.synthetic.loc[1, "wm"] == pytest.approx(1.0)
    assert vf.synthetic.loc[0, "brain_fraction"] == pytest.approx(40 / 64)
    pd.testing.assert_frame_equal(vf.synthetic, vf.training)  # probabilistic and hard agree
    assert np.allclose(vf.summary["difference"], 0)
    real = np.stack(cohort["labels"])
    vf2 = Q.volume_fractions_vs_training(real[:2], real[2:], names)
    assert set(vf2.summary["class"]) >= {"gm", "wm", "wmh", "oedema"}


def test_evaluate_quality_tables(cohort, tmp_path):
    d = cohort["dir"]
    real = [{"subject": f"sub{i}", "labelprob": cohort["label_paths"][i], "t1": cohort["image_paths"]["t1"][i],
             "t2": cohort["image_paths"]["t2"][i]} for i in range(4)]
    syn = [dict(real[1], subject="syn_copy"), dict(real[3], subject="syn_copy2")]
    paths = Q.evaluate_quality(syn, real, ["t1", "t2"], tmp_path)
    mem = pd.read_csv(paths["memorisation"], sep="\t")
    assert mem["near_copy"].all() and list(mem["nearest_real_label"]) == ["sub1", "sub3"]
    met = pd.read_csv(paths["metrics"], sep="\t")
    assert {"ms_ssim_diversity", "mmd"} <= set(met["metric"])
    assert pd.read_csv(paths["volume_fractions_summary"], sep="\t").shape[0] > 0
    assert d.exists()


# --------------------------------------------------------------------------- common


def test_common_helpers(cohort, tmp_path):
    with pytest.raises(InputError):
        C.merge_config({"a": {"b": 1}}, {"a": {"c": 2}})
    assert C.merge_config({"a": {"b": 1, "c": 0}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    x = torch.rand(1, K, 5, 7)
    x = x / x.sum(1, keepdim=True)
    y = C.pad_background(x, (8, 8))
    assert torch.allclose(y.sum(1), torch.ones(1, 8, 8)) and torch.equal(C.crop_to(y, (5, 7)), x)
    bad = np.full(SHAPE + (K,), 0.5, np.float32)
    nib.save(nib.Nifti1Image(bad, AFFINE), tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match="sum to 1"):
        C.load_prob_label(tmp_path / "bad.nii.gz")
    assert C.get_device("auto").type in ("cpu", "cuda")
    assert not C.amp_enabled(torch.device("cpu"), True)
    assert LG.subject_of_path("/x/sub-10_labelprob.nii.gz", ["sub-1", "sub-10"]) == "sub-10"
    assert LG.subject_of_path("/x/sub-1_labelprob.nii.gz", ["sub-1", "sub-10"]) == "sub-1"


def test_mixed_precision_follows_the_device(monkeypatch):
    """amp: the image generators train in float16 on CUDA only; sampling in bfloat16 on a CPU
    where it is faster than float32 (AMX), float32 elsewhere."""
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    assert C.amp_dtype("cpu") == torch.bfloat16 and C.sampling_amp("cpu", True)
    assert not C.amp_enabled("cpu", True) and not C.sampling_amp("cpu", False)
    layer = torch.nn.Linear(4, 4)
    with C.autocast("cpu", True):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with C.autocast("cpu", False):
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: False)
    assert C.amp_dtype("cpu") is None and not C.sampling_amp("cpu", True)
    assert C.amp_dtype("cuda") == torch.float16 and C.amp_enabled("cuda", True)


def test_cpu_bfloat16_only_with_amx(monkeypatch):
    """bfloat16 on a CPU only with AMX tiles: on AVX-512 with bfloat16 instructions but no AMX it
    was slower than float32 for every label-generator job measured (README, Timings), and
    without native kernels it runs emulated."""
    for kernels, amx, fast in [(True, True, True), (True, False, False), (False, True, False), (False, False, False)]:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda k=kernels: k)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
        assert C.cpu_bf16_kernels() is kernels and C.cpu_bf16_fast() is fast
        assert (C.amp_dtype("cpu") == torch.bfloat16) is fast


def test_precision_notice_only_where_float32_replaces_bfloat16(monkeypatch):
    """The run is told when the label generator will train in float32 on a CPU that lacks the
    AMX units that make the bfloat16 its amp setting asks for pay; not where it has them, nor with
    amp off."""
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: False)
    assert "no AMX units" in LG.precision_notice({"device": "cpu"})
    assert LG.precision_notice({"device": "cpu", "amp": False}) is None
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    assert LG.precision_notice({"device": "cpu"}) is None


def test_float32_cpu_training_of_3d_convolutions_goes_channels_last():
    """training_layout: channels-last for 3-D convolutions trained in float32 on a CPU (same
    values, reproducible), the default layout for bfloat16 training and for 2-D networks."""
    def net3d():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(8, 2, 3))

    x = torch.rand(2, 3, 8, 8, 8)
    fast, plain, half = net3d(), net3d(), net3d()
    assert C.training_layout(fast, "cpu", False) == "channels_last_3d"
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not plain[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(fast(x), plain(x), atol=1e-5) and torch.equal(fast(x), fast(x))
    assert C.training_layout(half, "cpu", True) == "contiguous"
    assert half[0].weight.is_contiguous()
    flat = torch.nn.Conv2d(3, 8, 3)
    assert C.training_layout(flat, "cpu", False) == "contiguous" and flat.weight.is_contiguous()


class _GarbageInBfloat16(torch.nn.Conv3d):
    """A convolution that fails the way oneDNN's bfloat16 kernels do at some small strided
    shapes: its bfloat16 output holds values it never computed, different every call."""

    def forward(self, x):
        y = super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            y = y + torch.rand(y.shape, dtype=y.dtype) * 1e30
        return y


def test_bfloat16_training_probe_refuses_a_faulty_convolution(monkeypatch, caplog):
    """The label generator's CPU training goes bfloat16 only where every convolution the model
    runs gives reproducible, float32-close outputs and gradients in bfloat16 (checked on the
    shapes of its batches); a faulty one names itself and the training stays float32. The probe
    leaves the random generators as they were."""
    good = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Conv3d(4, 4, 3, stride=2, padding=1))
    bad = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), _GarbageInBfloat16(4, 4, 3, stride=2, padding=1))
    x = torch.rand(2, 2, 8, 10, 8)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert C.bf16_convolution_problem(good, lambda: good(x)) is None
    assert torch.equal(torch.get_rng_state(), state)
    problem = C.bf16_convolution_problem(bad, lambda: bad(x))
    assert "_GarbageInBfloat16(4->4, stride (2, 2, 2)) on [2, 4, 8, 10, 8]" in problem
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    assert C.training_amp("cpu", True, good, lambda: good(x), "test net")
    assert not C.training_amp("cpu", False, good, lambda: good(x), "test net")
    with caplog.at_level(logging.WARNING, logger="brainsynth.generators"):
        assert not C.training_amp("cpu", True, bad, lambda: bad(x), "test net")
    assert "test net: training in float32, not bfloat16" in caplog.text
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: False)
    assert not C.training_amp("cpu", True, good, lambda: good(x), "test net")


def test_bfloat16_inference_guard_answers_a_faulty_convolution_in_float32(caplog):
    """Sampling models carry a guard: under CPU bfloat16 autocast each convolution is checked at
    the first call of each input shape; a faulty one answers in float32 from then on (with a
    warning naming it), a sound one keeps its bfloat16 output bit for bit."""
    torch.manual_seed(0)
    faulty = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), _GarbageInBfloat16(4, 4, 3, stride=2, padding=1))
    x = torch.rand(2, 2, 8, 10, 8)
    with torch.no_grad():
        ref = faulty(x)
        with C.autocast("cpu", True):
            unguarded = faulty(x).float()
            sound_part = faulty[0](x)
    assert float((unguarded - ref).abs().max()) > 1e20
    C.guard_bf16_inference(faulty, "test net")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="brainsynth.generators"):
        with C.autocast("cpu", True):
            guarded = [faulty(x).float() for _ in range(2)]
            assert torch.equal(faulty[0](x), sound_part)
        assert torch.equal(faulty(x), ref)  # outside autocast the hooks do nothing
    for g in guarded:
        assert float((g - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert caplog.text.count("test net: _GarbageInBfloat16(4->4, stride (2, 2, 2)) on [2, 4, 8, 10, 8]") == 1


@pytest.mark.skipif(not C.cpu_bf16_kernels(), reason="no native bfloat16 kernels on this CPU")
def test_label_vae_trains_in_bfloat16_here_reproducibly(cohort, tmp_path, monkeypatch, caplog):
    """Where this CPU runs bfloat16 natively the label VAE trains under bfloat16 autocast as the
    demo's AMX machine does (taken here whether or not it is the faster path): two runs give the
    same weights bit for bit, float32 (amp: false) others; a checkpoint written in float32 (a
    CPU without AMX) is not resumed in bfloat16."""
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    cfg = _cfg(LABEL_CFG, checkpoint_every=2, vae={"steps": 4, "adv_weight": 0.0})
    a = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "a")
    b = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "b")
    _same_weights(_state(a["model"]), _state(b["model"]), atol=0)
    assert torch.load(a["model"], weights_only=False)["training_amp"] is True
    f = LG.train_label_vae(cohort["label_paths"], _cfg(cfg, amp=False), tmp_path / "f")
    assert any(not torch.equal(x, y) for x, y in zip(_state(a["model"]).values(), _state(f["model"]).values()))
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: False)
    LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "c", max_steps_this_run=2)
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    with caplog.at_level(logging.WARNING, logger="brainsynth.generators"):
        c = LG.train_label_vae(cohort["label_paths"], cfg, tmp_path / "c")
    assert "another configuration" in caplog.text
    _same_weights(_state(c["model"]), _state(a["model"]), atol=0)


@pytest.mark.skipif(not C.cpu_bf16_kernels(), reason="no native bfloat16 kernels on this CPU")
def test_label_sampling_in_bfloat16_is_reproducible_and_close_to_float32(models, tmp_path, monkeypatch):
    """Sampling under amp (bfloat16, as on the demo's AMX machine) repeats exactly for a seed and
    draws the maps float32 draws, up to rounding."""
    monkeypatch.setattr(C, "cpu_bf16_fast", lambda: True)
    cond = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]], np.float32)
    a = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=1, progress=False)
    b = LG.sample_labels(models["vae"]["model"], models["ldm"]["model"], cond, seed=1, progress=False)
    assert np.array_equal(a, b)
    payload = torch.load(models["ldm"]["model"], map_location="cpu", weights_only=False)
    payload["config"]["amp"] = False
    fp32 = tmp_path / "ldm_fp32.pt"
    torch.save(payload, fp32)
    c = LG.sample_labels(models["vae"]["model"], fp32, cond, seed=1, progress=False)
    assert not np.array_equal(a, c)
    assert (a.argmax(1) == c.argmax(1)).mean() > 0.9


@pytest.mark.slow
def test_demo_networks_sample_plausible_tissue_fractions(tmp_path):
    """The demo-scale networks (DEFAULTS), trained briefly, give samples whose class volume
    fractions match the training set: the test the demo config is tuned against."""
    shape = (24, 28, 24)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    rng = np.random.default_rng(4)
    paths, rows, labs = [], [], []
    for i in range(8):
        c = np.array(shape) / 2 + rng.normal(0, 0.8, 3)
        radii = np.array([9.0, 11.0, 9.0]) * rng.uniform(0.9, 1.1)
        r = np.linalg.norm((g - c) / radii, axis=-1)
        lab = np.zeros(shape, np.uint8)
        lab[r < 1.0] = 1                     # csf rim
        lab[r < 0.85] = 2                    # gm
        lab[r < 0.6] = 3                     # wm
        lab[(r < 0.25)] = 4                  # deep gm
        labs.append(lab)
        p = tmp_path / f"sub{i}_tissue_prob.nii.gz"
        nib.save(nib.Nifti1Image(np.eye(K, dtype=np.float32)[lab], AFFINE), p)
        paths.append(str(p))
        rows.append({"subject": f"sub{i}", "dc_wmh": 0.0, "dc_tumour": 0.0})
    pd.DataFrame(rows).to_csv(tmp_path / "cond.tsv", sep="\t", index=False)
    cfg = {"device": "cpu", "seed": 0, "num_threads": 2, "checkpoint_every": 1000, "log_every": 1000,
           "vae": {"patch_size": None, "steps": 150, "batch_size": 2},
           "ldm": {"steps": 300}}
    vae = LG.train_label_vae(paths, cfg, tmp_path / "label")
    ldm = LG.train_label_ldm(vae["model"], paths, tmp_path / "cond.tsv", cfg, tmp_path / "label")
    prob = LG.sample_labels(vae["model"], ldm["model"], np.zeros((6, 2), np.float32), seed=1, progress=False)
    vf = Q.volume_fractions_vs_training(prob, np.stack(labs), LG.LabelSchema().names)
    s = vf.summary.set_index("class")
    assert abs(s.loc["brain_fraction", "difference"]) < 0.05, s
    for c in ("csf", "gm", "wm"):
        assert abs(s.loc[c, "difference"]) < 0.1, s


@pytest.mark.parametrize("kind", ["epsilon", "sample"])
def test_ldm_prediction_types_train_and_sample(models, cohort, tmp_path, kind):
    cfg = _cfg(LABEL_CFG, ldm={"prediction_type": kind, "steps": 4})
    ldm = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path)
    payload = torch.load(ldm["model"], map_location="cpu", weights_only=False)
    assert payload["scheduler_kwargs"]["prediction_type"] == kind
    out = LG.sample_labels(models["vae"]["model"], ldm["model"], np.zeros((1, 2), np.float32), "ddim", 3)
    assert np.allclose(out.sum(1), 1.0, atol=1e-4)
    with pytest.raises(InputError, match="ldm.prediction_type"):
        LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"],
                           _cfg(LABEL_CFG, ldm={"prediction_type": "x0"}), tmp_path / "bad")


def test_rare_class_patches_and_weights():
    # 2 subjects, 3 classes: background, a common class, a rare one only in subject 1
    data = torch.zeros(2, 3, 16, 16, 16)
    data[:, 0] = 1
    data[:, 0, :4], data[:, 1, :4] = 0, 1
    data[1, :, 12, 12, 12] = torch.tensor([0.0, 0.0, 1.0])
    frequency = data.mean(dim=(0, 2, 3, 4))
    assert C.rare_classes(frequency) == [2] and float(frequency[2]) < C.RARE_CLASS_FREQUENCY
    centres = LG.rare_class_voxels(data, [2])
    assert list(centres) == [1] and centres[1][0].tolist() == [[12, 12, 12]]
    torch.manual_seed(0)
    # fraction 1: every patch of subject 1 holds the rare voxel, clipped to the grid
    for _ in range(20):
        o = LG.patch_origin([16, 16, 16], [8, 8, 8], centres[1], 1.0)
        assert all(0 <= a <= 8 and a <= 12 < a + 8 for a in o), o
    # fraction 0 or no rare voxel: uniform patches, some of which miss it
    origins = [LG.patch_origin([16, 16, 16], [8, 8, 8], centres.get(0), 1.0) for _ in range(50)]
    assert any(not all(a <= 12 < a + 8 for a in o) for o in origins)
    # inverse sqrt frequency: the rare class weighs most, mean 1 over present classes
    w = LG.class_weights(frequency, "inverse_sqrt_frequency")
    assert float(w[2]) > float(w[1]) > float(w[0]) and float(w.mean()) == pytest.approx(1.0)
    assert LG.class_weights(frequency, "none") is None
    with pytest.raises(InputError, match="class_weighting"):
        LG.class_weights(frequency, "inverse")


def test_class_balanced_l1_weighs_each_class_alike():
    # a slice of 100 voxels: 96 of class 1 (exact), 4 of class 2 (off by 0.5)
    seg = torch.zeros(1, 3, 10, 10)
    seg[0, 1] = 1
    seg[0, 1, 0, :4], seg[0, 2, 0, :4] = 0, 1
    target = torch.zeros(1, 1, 10, 10)
    fake = target.clone()
    fake[0, 0, 0, :4] = 0.5
    assert float(torch.nn.functional.l1_loss(fake, target)) == pytest.approx(0.02)
    assert float(IG.class_balanced_l1(fake, target, seg)) == pytest.approx(0.25)  # (0 + 0.5) / 2
    # background voxels do not count, nor do classes absent from the slice
    seg_bg = seg.clone()
    seg_bg[0, :, 5:] = 0
    seg_bg[0, 0, 5:] = 1
    fake[0, 0, 5:] = 1.0
    assert float(IG.class_balanced_l1(fake, target, seg_bg)) == pytest.approx(0.25)


def test_rare_class_slices_and_oversampled_training(cohort, tmp_path):
    co = C.Cohort(cohort["label_paths"])
    labels, brain = torch.from_numpy(co.labels), [torch.from_numpy(z) for z in co.brain]
    rare, per_subject = IG.rare_class_slices(labels, brain)
    assert {6, 8} <= set(rare) and not {1, 2, 3} & set(rare)  # lesions (< 1% of the voxels), not the tissues
    for s, per in per_subject.items():
        for zs in per:
            lesion = (labels[s][rare].float() > 0.5).sum(dim=(0, 1, 2))
            assert all(int(lesion[int(z)]) >= 3 for z in zs)
    cfg = _cfg(IMAGE_CFG, steps=2, rare_class_oversample=1.0, weights={"class_l1": 1.0})
    r = IG.train_image_generator(cohort["label_paths"], cohort["image_paths"], cfg, tmp_path)
    hist = pd.read_csv(r["losses_tsv"], sep="\t")
    assert (hist["class_l1"] > 0).all()


def test_checkpoint_bytes_do_not_depend_on_the_temporary_file_name(tmp_path):
    # torch.save(path) names the archive after the file: the atomic writer's random
    # temporary name made identical weights differ byte for byte between runs
    from brainsynth.generators.common import torch_save, torch_load

    state = {"weights": torch.arange(6, dtype=torch.float32), "step": 3}
    a, b = torch_save(state, tmp_path / "a.pt"), torch_save(state, tmp_path / "run2" / "a.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch_load(a)["weights"], state["weights"])


def test_condition_context_null_differs_from_healthy():
    ctx = LG.condition_context(np.array([[0.0, 0.0], [0.3, 0.1]], np.float32), keep=[1.0, 0.0])
    assert ctx.shape == (2, 1, 3)
    np.testing.assert_array_equal(ctx[0, 0].numpy(), [0.0, 0.0, 1.0])   # healthy: flag on
    np.testing.assert_array_equal(ctx[1, 0].numpy(), [0.0, 0.0, 0.0])   # null context


def test_condition_context_presence_flags():
    cond = np.array([[0.0, 0.0], [0.3, 0.0], [0.3, 0.1]], np.float32)
    ctx = LG.condition_context(cond, keep=[1.0, 1.0, 0.0], presence=True)
    assert ctx.shape == (3, 1, 5) and LG.context_dim(2, True) == 5 and LG.context_dim(2, False) == 3
    np.testing.assert_allclose(ctx[0, 0].numpy(), [0.0, 0.0, 0.0, 0.0, 1.0])   # healthy
    np.testing.assert_allclose(ctx[1, 0].numpy(), [0.3, 0.0, 1.0, 0.0, 1.0])   # WMH only
    np.testing.assert_allclose(ctx[2, 0].numpy(), [0.0] * 5)                    # null context
    null, healthy, wmh_alone, tumour_alone = LG.composed_contexts(cond[2:], presence=True)
    np.testing.assert_allclose(tumour_alone[0, 0].numpy(), [0.0, 0.1, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(wmh_alone[0, 0].numpy(), [0.3, 0.0, 1.0, 0.0, 1.0])
    assert not null.any() and healthy[0, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_one_token_cross_attention_is_linear_in_the_context():
    """Why ``ldm.lesion_presence`` exists: over a context of one token the softmax weight is 1,
    so MONAI's cross-attention adds ``W context + b`` whatever the features; dc enters the U-Net
    there as a scaled vector, and a small lesion's request is a scaled-down large one."""
    from monai.networks.blocks import CrossAttentionBlock
    torch.manual_seed(0)
    block = CrossAttentionBlock(hidden_size=8, num_heads=2, context_input_size=3).eval()
    x, y = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    c = torch.tensor([[[0.3, 0.0, 1.0]]])
    with torch.no_grad():
        base = block(x, context=torch.zeros_like(c))
        one, two = block(x, context=c) - base, block(x, context=2 * c) - base
        other = block(y, context=c) - block(y, context=torch.zeros_like(c))
    assert one.abs().max() > 1e-3
    torch.testing.assert_close(two, 2 * one)                 # linear in the context
    torch.testing.assert_close(other, one)                   # the same shift for every feature vector


def test_lesion_presence_trains_and_samples(models, cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, ldm={"lesion_presence": True, "condition_channels": True, "condition_dropout": 0.5,
                               "steps": 3})
    ldm = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path)
    payload = torch.load(ldm["model"], map_location="cpu", weights_only=False)
    assert payload["unet_kwargs"]["cross_attention_dim"] == 5   # 2 dc + 2 presence flags + conditioned
    assert payload["unet_kwargs"]["in_channels"] == payload["unet_kwargs"]["out_channels"] + 5
    cond = np.array([[0.0, 0.0], [0.4, 0.6]], np.float32)
    sampling = {"guidance_scale": 2.0, "compose_lesion_types": True}
    out = LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3, seed=1, sampling=sampling)
    assert out.shape == (2, K) + SHAPE and np.allclose(out.sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(out, LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3,
                                                        seed=1, sampling=sampling))
    plain = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"],
                               _cfg(cfg, ldm={**cfg["ldm"], "lesion_presence": False}), tmp_path / "plain")
    without = LG.sample_labels(models["vae"]["model"], plain["model"], cond, "ddim", 3, seed=1, sampling=sampling)
    assert not np.allclose(out, without)
    old = torch.load(plain["model"], map_location="cpu", weights_only=False)   # a model file from before the key
    del old["config"]["ldm"]["lesion_presence"]
    torch.save(old, tmp_path / "old.pt")
    np.testing.assert_array_equal(without, LG.sample_labels(models["vae"]["model"], tmp_path / "old.pt", cond, "ddim",
                                                            3, seed=1, sampling=sampling))


def test_ldm_on_blocks_of_latent_voxels_trains_resumes_and_samples(models, cohort, tmp_path):
    """ldm.patch_size 2: the U-Net runs on 2x2x2 blocks of the latent; the model file rebuilds it,
    a kill resumes to the same weights, and sampling draws maps on the working grid."""
    cfg = _cfg(LABEL_CFG, ldm={"patch_size": 2, "channels": [8, 8], "attention_levels": [False, True],
                               "condition_channels": True, "steps": 4})
    ldm = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "a")
    payload = torch.load(ldm["model"], map_location="cpu", weights_only=False)
    assert payload["unet_kwargs"]["patch_size"] == 2 and payload["unet_kwargs"]["out_channels"] == 2
    assert payload["latent_shape"] == [8, 10, 8]
    assert payload["padded_latent_shape"] == [8, 12, 8]  # divisible by 2 (levels) x 2 (blocks)
    unet, _ = LG.load_ldm(ldm["model"])
    assert unet.unet.conv_in.conv.in_channels == (2 + 3) * 8 and unet.unet.out[-1].conv.out_channels == 2 * 8
    part = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "b",
                              max_steps_this_run=2)
    assert not part["completed"]
    resumed = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "b")
    _same_weights(_state(ldm["model"]), _state(resumed["model"]))
    cond = np.array([[0.0, 0.0], [0.4, 0.6]], np.float32)
    out = LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3, seed=1)
    assert out.shape == (2, K) + SHAPE and np.allclose(out.sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(out, LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3, seed=1))


def test_classifier_free_guidance_trains_and_samples(models, cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, ldm={"condition_dropout": 0.5, "steps": 4})
    ldm = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path)
    cond = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    plain = LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3, seed=2)
    guided = LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3, seed=2,
                              sampling={"guidance_scale": 3.0})
    assert guided.shape == plain.shape and np.allclose(guided.sum(1), 1.0, atol=1e-4)
    assert not np.allclose(guided, plain)
    np.testing.assert_array_equal(guided, LG.sample_labels(models["vae"]["model"], ldm["model"], cond, "ddim", 3,
                                                           seed=2, sampling={"guidance_scale": 3.0}))
    no_dropout = _cfg(LABEL_CFG, ldm={"condition_dropout": 0.0, "steps": 2})
    ldm0 = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], no_dropout,
                              tmp_path / "no_dropout")
    with pytest.raises(InputError, match="condition_dropout"):
        LG.sample_labels(models["vae"]["model"], ldm0["model"], cond, "ddim", 3, sampling={"guidance_scale": 2.0})


def test_vae_dice_ce_reconstruction_loss(cohort, tmp_path):
    out = LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_loss": "dice_ce",
                                                                          "steps": 6}), tmp_path)
    losses = pd.read_csv(out["losses_tsv"], sep="\t")
    assert np.isfinite(losses["reconstruction"]).all()
    with pytest.raises(InputError, match="reconstruction_loss"):
        LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_loss": "l1"}), tmp_path / "x")


def test_vae_reconstruction_target_argmax_scores_the_counted_classes(cohort, tmp_path):
    # a near tie (0.45 / 0.55) is class 1 after argmax: the argmax target is that class, one-hot
    x = torch.tensor([[0.6, 0.4], [0.45, 0.55]]).T.reshape(1, 2, 2, 1, 1)
    hard = LG.reconstruction_target(x, "argmax")
    assert torch.equal(hard, torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1, 1))
    assert LG.reconstruction_target(x, "soft") is x
    logits = torch.tensor([[0.3, -0.2], [0.1, 0.0]]).T.reshape(1, 2, 2, 1, 1)
    recon = LG.reconstruction_loss("dice_ce", 2.0, None)
    v = {**LG.DEFAULTS["vae"], "reconstruction_target": "argmax"}
    z = torch.zeros(1, 1, 1, 1, 1)
    got = LG._vae_generator_losses(v, logits, z, torch.ones_like(z), x, recon, None, None, None)[0]
    assert float(got["reconstruction"]) == pytest.approx(float(recon(logits, hard)))
    soft = LG._vae_generator_losses({**v, "reconstruction_target": "soft"}, logits, z, torch.ones_like(z), x, recon,
                                    None, None, None)[0]
    assert float(soft["reconstruction"]) != pytest.approx(float(got["reconstruction"]))
    out = LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_target": "argmax",
                                                                          "steps": 4}), tmp_path)
    assert np.isfinite(pd.read_csv(out["losses_tsv"], sep="\t")["reconstruction"]).all()
    with pytest.raises(InputError, match="reconstruction_target"):
        LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_target": "hard"}),
                           tmp_path / "x")


def test_vae_reconstruction_target_keeps_lesion_voxels_soft(cohort, tmp_path, monkeypatch):
    # channels background, tissue, lesion: voxels without lesion probability go one-hot (a 0.45 /
    # 0.55 tie included), a voxel with any lesion probability keeps its soft map, every argmax stays
    x = torch.tensor([[0.45, 0.55, 0.0], [0.6, 0.4, 0.0], [0.3, 0.5, 0.2], [0.1, 0.3, 0.6]]).T.reshape(1, 3, 4, 1, 1)
    got = LG.reconstruction_target(x, "argmax_outside_lesions", [2])
    want = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.5, 0.2], [0.1, 0.3, 0.6]]).T.reshape(1, 3, 4, 1, 1)
    assert torch.equal(got, want)
    assert torch.equal(got.argmax(1), x.argmax(1))
    logits = torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.0, -0.4], [0.2, 0.2, 0.0], [-0.1, 0.0, 0.5]]).T.reshape(1, 3, 4, 1, 1)
    recon = LG.reconstruction_loss("dice_ce", 2.0, None)
    v = {**LG.DEFAULTS["vae"], "reconstruction_target": "argmax_outside_lesions"}
    z = torch.zeros(1, 1, 1, 1, 1)
    loss = LG._vae_generator_losses(v, logits, z, torch.ones_like(z), x, recon, None, None, None, [2])[0]
    assert float(loss["reconstruction"]) == pytest.approx(float(recon(logits, want)))
    assert float(loss["reconstruction"]) != pytest.approx(float(recon(logits, LG.reconstruction_target(x, "argmax"))))
    # the trainer hands it the schema's lesion classes (WMH, necrotic, oedema, enhancing)
    seen = []
    original = LG.reconstruction_target
    monkeypatch.setattr(LG, "reconstruction_target", lambda x, kind, les=(): seen.append(list(les)) or original(x, kind, les))
    out = LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_target": "argmax_outside_lesions",
                                                                          "steps": 4}), tmp_path)
    assert np.isfinite(pd.read_csv(out["losses_tsv"], sep="\t")["reconstruction"]).all()
    assert seen and all(les == [6, 7, 8, 9] for les in seen)
    # the configured schema, not the default one: tumour classes only; one with no lesion class is refused
    seen.clear()
    tumour_only = LabelSchema.from_config({"labels": {"lesion_types": {"tumour": ["necrotic", "oedema", "enhancing"]}}})
    LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_target": "argmax_outside_lesions",
                                                                    "steps": 1}), tmp_path / "t", schema=tumour_only)
    assert seen and all(les == [7, 8, 9] for les in seen)
    with pytest.raises(InputError, match="lesion classes"):
        LG.train_label_vae(cohort["label_paths"], _cfg(LABEL_CFG, vae={"reconstruction_target": "argmax_outside_lesions"}),
                           tmp_path / "n", schema=LabelSchema.from_config({"labels": {"lesion_types": {}}}))


def test_condition_channels_path_trains_and_samples(models, cohort, tmp_path):
    cfg = _cfg(LABEL_CFG, ldm={"condition_channels": True, "steps": 3})
    ldm = LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path)
    payload = torch.load(ldm["model"], map_location="cpu", weights_only=False)
    assert payload["unet_kwargs"]["in_channels"] == payload["unet_kwargs"]["out_channels"] + 3  # 2 dc + flag
    out = LG.sample_labels(models["vae"]["model"], ldm["model"], np.array([[0.0, 1.0]], np.float32), "ddim", 3,
                           sampling={"guidance_scale": 2.0})
    assert out.shape == (1, K) + SHAPE and np.allclose(out.sum(1), 1.0, atol=1e-4)


def test_latent_lesion_mask_covers_lesions_only():
    schema = LG.LabelSchema()
    data = torch.zeros(2, K, 8, 8, 8)
    data[:, 0] = 1
    data[0, 0, 1, 1, 1], data[0, schema.value("oedema"), 1, 1, 1] = 0, 1   # one lesion voxel in map 0
    mask = LG.latent_lesion_mask(data, schema, (4, 4, 4))
    assert mask.shape == (2, 1, 4, 4, 4)
    assert mask[0, 0, 0, 0, 0] == 1 and mask.sum() == 1   # the latent voxel over it, nothing else


def test_loss_weights_per_lesion_type():
    schema = LG.LabelSchema()
    data = torch.zeros(1, K, 8, 8, 8)
    data[:, 0] = 1
    data[0, 0, 1, 1, 1], data[0, schema.value("wmh"), 1, 1, 1] = 0, 1          # WMH: latent voxel (0, 0, 0)
    data[0, 0, 7, 7, 7], data[0, schema.value("oedema"), 7, 7, 7] = 0, 1       # tumour: latent voxel (3, 3, 3)
    data[0, 0, 6, 0, 0], data[0, schema.value("wmh"), 6, 0, 0] = 0, 1          # both types meet in (3, 0, 0)
    data[0, 0, 7, 1, 1], data[0, schema.value("enhancing"), 7, 1, 1] = 0, 1
    same = LG.latent_loss_weights(data, schema, (4, 4, 4), 10)
    assert torch.equal(same, 1 + 10 * LG.latent_lesion_mask(data, schema, (4, 4, 4)))   # a number: as before
    w = LG.latent_loss_weights(data, schema, (4, 4, 4), {"wmh": 10, "tumour": 2})
    assert (w[0, 0, 0, 0, 0], w[0, 0, 3, 3, 3], w[0, 0, 3, 0, 0]) == (11, 3, 11)        # the larger where types meet
    assert (w == 1).sum() == 64 - 3
    only_wmh = LG.latent_loss_weights(data, schema, (4, 4, 4), {"wmh": 10, "tumour": 0})
    assert only_wmh[0, 0, 3, 3, 3] == 1 and only_wmh[0, 0, 0, 0, 0] == 11
    assert LG.latent_loss_weights(data, schema, (4, 4, 4), 0) is None
    assert LG.latent_loss_weights(data, schema, (4, 4, 4), {"wmh": 0}) is None


@pytest.mark.parametrize("weight, message", [({"lesions": 5}, "lesion types \\['lesions'\\]"),
                                             ({"wmh": -1}, "number >= 0"), (True, "number >= 0")])
def test_bad_lesion_weight_is_refused_before_training(models, cohort, tmp_path, weight, message):
    cfg = _cfg(LABEL_CFG, ldm={"lesion_weight": weight, "steps": 2})
    with pytest.raises(InputError, match=message) as err:
        LG.train_label_ldm(models["vae"]["model"], cohort["label_paths"], cohort["cond"], cfg, tmp_path / "x")
    assert err.value.field == "label_generator.ldm.lesion_weight" and not (tmp_path / "x").exists()


def test_paper_preset_starts_from_the_study_settings():
    paper = LG.resolve_config({"preset": "paper", "vae": {"steps": 7}})
    assert paper["vae"]["channels"] == LG.PAPER["vae"]["channels"] and paper["vae"]["steps"] == 7
    assert paper["ldm"]["prediction_type"] == "epsilon" and LG.resolve_config({})["vae"] == LG.DEFAULTS["vae"]
    assert IG.resolve_config({"preset": "paper"})["channels"] == IG.PAPER["channels"]
    assert IG.resolve_config({"preset": "demo"})["channels"] == IG.DEFAULTS["channels"]
    with pytest.raises(InputError, match="label_generator.preset"):
        LG.resolve_config({"preset": "huge"})
