"""The SPADE diffusion image generator: trains a few steps, resumes, samples the right shape,
deterministically per seed, into the sample contract."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainsynth.errors import InputError
from brainsynth.generators import spade_diffusion as sd
from brainsynth.generators.contract import check_samples

TINY = {"steps": 6, "batch_size": 2, "channels": [8, 16], "attention_levels": [False, False],
        "norm_num_groups": 4, "num_head_channels": 8, "spade_intermediate_channels": 8, "num_train_timesteps": 50,
        "inference_steps": 3, "checkpoint_every": 3, "log_every": 1, "num_threads": 1, "device": "cpu"}


def _subjects(root, n=2, k=4):
    """Probabilistic maps (k classes: background + 3 tissues) and T1/FLAIR images on a 12x16x6 grid."""
    rng = np.random.default_rng(0)
    labels, images = [], {"t1": [], "flair": []}
    for i in range(n):
        hard = np.zeros((12, 16, 6), np.int64)
        hard[2:10, 3:13, 1:5] = 1
        hard[4:8, 5:11, 1:5] = 2
        hard[5:7, 7:9, 2:4] = 3
        prob = np.eye(k, dtype=np.float32)[hard]
        paths = {"label": root / f"s{i}_labelprob.nii.gz"}
        nib.save(nib.Nifti1Image(prob, np.eye(4)), paths["label"])
        labels.append(paths["label"])
        for m, values in (("t1", [0, 0.3, 0.6, 0.9]), ("flair", [0, 0.7, 0.5, 0.4])):
            img = np.asarray(values, np.float32)[hard] + 0.02 * rng.standard_normal(hard.shape).astype(np.float32)
            p = root / f"s{i}_{m}.nii.gz"
            nib.save(nib.Nifti1Image(img, np.eye(4)), p)
            images[m].append(p)
    return labels, images


def test_trains_resumes_and_samples_deterministically(tmp_path):
    labels, images = _subjects(tmp_path)
    out = tmp_path / "model"
    assert sd.train_spade_diffusion(labels, images, TINY, out, max_steps_this_run=3) == {"completed": False}
    paths = sd.train_spade_diffusion(labels, images, TINY, out)
    losses = pd.read_csv(paths["losses_tsv"], sep="\t")
    assert losses["step"].tolist() == list(range(1, 7)) and np.isfinite(losses["mse"]).all()
    assert (out / "checkpoints" / "spade_diffusion_last.pt").exists()

    kwargs = dict(model=paths["model"], label_paths={"synth0001": labels[0], "synth0002": labels[1]},
                  modalities=["t1", "flair"], device="cpu", montage=False)
    manifest = sd.sample_spade_diffusion(out_dir=tmp_path / "a", seed=4, **kwargs)
    sd.sample_spade_diffusion(out_dir=tmp_path / "b", seed=4, **kwargs)
    sd.sample_spade_diffusion(out_dir=tmp_path / "c", seed=5, **kwargs)
    assert list(manifest["subject"]) == ["synth0001", "synth0002"]
    check_samples(tmp_path / "a", ["synth0001", "synth0002"], ["t1", "flair"], "spade_diffusion")
    a = nib.load(tmp_path / "a" / "samples" / "synth0001" / "t1.nii.gz").get_fdata()
    label = nib.load(tmp_path / "a" / "samples" / "synth0001" / "label.nii.gz").get_fdata()
    assert a.shape == (12, 16, 6) and 0 <= a.min() and a.max() <= 1
    assert not a[label == 0].any() and a[label > 0].std() > 0
    assert np.array_equal(a, nib.load(tmp_path / "b" / "samples" / "synth0001" / "t1.nii.gz").get_fdata())
    assert not np.array_equal(a, nib.load(tmp_path / "c" / "samples" / "synth0001" / "t1.nii.gz").get_fdata())
    flair = nib.load(tmp_path / "a" / "samples" / "synth0001" / "flair.nii.gz").get_fdata()
    assert not np.array_equal(a, flair)  # the modality embedding changes the image


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_trains_and_samples(tmp_path, prediction_type):
    """The training target and the sampler follow prediction_type (the model records it)."""
    labels, images = _subjects(tmp_path)
    paths = sd.train_spade_diffusion(labels, images, {**TINY, "steps": 2, "prediction_type": prediction_type},
                                     tmp_path / "m")
    net, payload = sd.load_model(paths["model"], torch.device("cpu"))
    assert payload["config"]["prediction_type"] == prediction_type
    prob = np.moveaxis(nib.load(labels[0]).get_fdata().astype(np.float32), -1, 0)
    img = sd.generate_volume(net, payload, prob, "t1", 0)
    assert img.shape == (12, 16, 6) and np.isfinite(img).all()


def test_diffusion_target_hand_case():
    """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (MONAI's get_velocity)."""
    from monai.networks.schedulers import DDPMScheduler

    from brainsynth.generators import common as C

    sched = DDPMScheduler(num_train_timesteps=10)
    x0, noise, t = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -1.0), torch.tensor([3])
    a = sched.alphas_cumprod[3]
    assert torch.allclose(C.diffusion_target(sched, "v_prediction", x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert torch.equal(C.diffusion_target(sched, "epsilon", x0, noise, t), noise)
    assert torch.equal(C.diffusion_target(sched, "sample", x0, noise, t), x0)


def test_resume_continues_from_the_checkpoint(tmp_path, caplog):
    labels, images = _subjects(tmp_path)
    out = tmp_path / "model"
    sd.train_spade_diffusion(labels, images, TINY, out, max_steps_this_run=3)
    with caplog.at_level("INFO", logger="brainsynth"):
        resumed = sd.train_spade_diffusion(labels, images, TINY, out)
    assert "resuming spade_diffusion from checkpoint step 3" in caplog.text
    # the resumed run draws what the uninterrupted one draws: the same losses, the same weights
    whole = sd.train_spade_diffusion(labels, images, TINY, tmp_path / "whole")
    a = pd.read_csv(resumed["losses_tsv"], sep="\t")["mse"]
    b = pd.read_csv(whole["losses_tsv"], sep="\t")["mse"]
    assert np.allclose(a, b, rtol=1e-5)
    # a sampling setting does not invalidate the checkpoint
    caplog.clear()
    with caplog.at_level("INFO", logger="brainsynth"):
        sd.train_spade_diffusion(labels, images, {**TINY, "inference_steps": 7}, out)
    assert "another configuration" not in caplog.text


def test_unknown_modality_and_key_are_named(tmp_path):
    labels, images = _subjects(tmp_path, n=1)
    with pytest.raises(InputError, match="spade_diffusion.lr_g"):
        sd.train_spade_diffusion(labels, images, {**TINY, "lr_g": 1e-3}, tmp_path / "x")
    with pytest.raises(InputError, match="spade_diffusion.prediction_type"):
        sd.train_spade_diffusion(labels, images, {**TINY, "prediction_type": "x0"}, tmp_path / "x")
    paths = sd.train_spade_diffusion(labels, images, {**TINY, "steps": 1}, tmp_path / "m")
    net, payload = sd.load_model(paths["model"], torch.device("cpu"))
    prob = np.moveaxis(nib.load(labels[0]).get_fdata().astype(np.float32), -1, 0)
    with pytest.raises(InputError, match="t2 was not trained"):
        sd.generate_volume(net, payload, prob, "t2", 0)


def test_paper_preset_builds_the_wider_network():
    paper = sd.resolve_config({"preset": "paper", "steps": 9})
    assert paper["channels"] == sd.PAPER["channels"] and paper["steps"] == 9
    assert paper["prediction_type"] == "epsilon" and sd.resolve_config({})["prediction_type"] == "v_prediction"
    assert sd.resolve_config({})["channels"] == sd.DEFAULTS["channels"]
    net = sd._net(paper, n_classes=10, n_modalities=3)
    small = sd._net(sd.resolve_config({}), n_classes=10, n_modalities=3)
    assert sum(p.numel() for p in net.parameters()) > 10 * sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 96, 128), torch.tensor([1, 500]), seg=torch.zeros(2, 10, 96, 128),
                  class_labels=torch.tensor([0, 2]))
    assert out.shape == (2, 1, 96, 128)
    with pytest.raises(InputError, match="spade_diffusion.preset"):
        sd.resolve_config({"preset": "huge"})
