"""Model files are data, not code: every loader uses ``torch.load(weights_only=True)``.

A crafted file whose pickle would run code is refused with a one-line InputError
naming the file and nothing runs; files our trainers write and checkpoints of the
shape nnU-Net v2's trainer writes load under the safe loaders.
"""

import os
import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainsynth import segmentation as seg
from brainsynth.errors import InputError
from brainsynth.generators import common as C
from brainsynth.generators.brainspade import image_generator as IG
from brainsynth.generators.brainspade import label_generator as LG
from test_generators import AFFINE, IMAGE_CFG, LABEL_CFG, T1, T2, K, _brain, _cfg

torch.set_num_threads(1)


class _RunsCode:
    """Unpickling this touches ``marker``: the attack a shared model file could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_refused(load, path, marker, match="refused to load"):
    with pytest.raises(InputError, match=match) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg and "fix:" in msg and "\n" not in msg
    assert not marker.exists(), "the payload ran while loading"


def test_torch_save_of_the_attack_would_run_it(tmp_path):
    """Guard for the tests below: the crafted file really runs code when loaded unsafely."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy_pickle"])
def test_generator_loaders_refuse_code(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "label_vae.pt"
    payload = {"kind": "label_vae", "state_dict": {}, "config": _RunsCode(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    match = r"refused to load.*\.system" if fmt == "zip" else "refused to load"
    _assert_refused(C.torch_load, path, marker, match)
    _assert_refused(LG.load_vae, path, marker, match)
    _assert_refused(LG.load_ldm, path, marker, match)
    _assert_refused(IG.load_generator, path, marker, match)


def test_refused_checkpoint_restarts_training_without_running_it(tmp_path, caplog):
    marker = tmp_path / "pwned"
    ck = C.Checkpointer(tmp_path, "net", 1, "fp")
    torch.save({"step": 3, "fingerprint": "fp", "rng": _RunsCode(marker)}, ck.path)
    net = torch.nn.Linear(2, 2)
    assert ck.load({"net": net}, {}, {}) == (0, [], {})
    assert "refused to load" in caplog.text and str(ck.path) in caplog.text
    assert not marker.exists()


def test_saving_a_non_data_object_fails_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['extra'\].*_RunsCode"):
        C.torch_save({"extra": _RunsCode(tmp_path / "m")}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_numpy_values_are_saved_as_plain_data(tmp_path):
    state = {"a": np.float64(0.25), "n": np.int64(3), "arr": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::-1],
             "p": tmp_path / "f.nii.gz", "t": (np.float32(1.5), "x")}
    out = C.torch_load(C.torch_save(state, tmp_path / "s.pt"))
    assert type(out["a"]) is float and type(out["n"]) is int and out["p"] == str(tmp_path / "f.nii.gz")
    assert torch.equal(out["arr"], torch.tensor([[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]))
    assert out["t"] == (1.5, "x")
    again = C.torch_save(state, tmp_path / "again" / "s.pt")
    assert again.read_bytes() == (tmp_path / "s.pt").read_bytes()


def test_checkpoint_restores_rng_states_under_the_safe_loader(tmp_path):
    import random

    ck = C.Checkpointer(tmp_path, "net", 1, "fp")
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    np.random.seed(7)
    random.seed(8)
    torch.manual_seed(9)
    ck.save(5, {"net": net}, {"opt": opt}, {}, [{"step": 5, "loss": 1.0}], {"scale": np.float32(0.5)})
    expect = (np.random.rand(3), random.random(), torch.rand(3))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3)
    step, hist, extra = ck.load({"net": net2}, {"opt": opt2}, {})
    assert (step, hist, extra) == (5, [{"step": 5, "loss": 1.0}], {"scale": 0.5})
    assert torch.equal(net2.weight, net.weight)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    got = (np.random.rand(3), random.random(), torch.rand(3))
    assert np.array_equal(got[0], expect[0]) and got[1] == expect[1] and torch.equal(got[2], expect[2])


# --------------------------------------------------------------------------- real generator files


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    labels, images, rows = [], {"t1": [], "t2": []}, []
    for i in range(4):
        lab = _brain(i, rng)
        labels.append(str(d / f"sub{i}_labelprob.nii.gz"))
        nib.save(nib.Nifti1Image(np.eye(K, dtype=np.float32)[lab], AFFINE), labels[-1])
        for m, lut in (("t1", T1), ("t2", T2)):
            images[m].append(str(d / f"sub{i}_{m}.nii.gz"))
            nib.save(nib.Nifti1Image(lut[lab], AFFINE), images[m][-1])
        rows.append({"subject": f"sub{i}", "dc_wmh": 0.25 * i, "dc_tumour": 1.0 - 0.25 * i})
    pd.DataFrame(rows).to_csv(d / "conditioning.tsv", sep="\t", index=False)
    cfg = _cfg(LABEL_CFG, checkpoint_every=1, vae={"steps": 2, "adv_warmup_steps": 1}, ldm={"steps": 2})
    vae = LG.train_label_vae(labels, cfg, d / "vae")
    ldm = LG.train_label_ldm(vae["model"], labels, d / "conditioning.tsv", cfg, d / "ldm")
    img = IG.train_image_generator(labels, images, _cfg(IMAGE_CFG, steps=2, checkpoint_every=1), d / "img")
    return {"vae": vae["model"], "ldm": ldm["model"], "img": img["model"]}


@pytest.mark.parametrize("name,kind", [("vae", "label_vae"), ("ldm", "label_ldm"), ("img", "image_generator")])
def test_our_model_and_checkpoint_files_load_safely(tiny_models, name, kind):
    path = tiny_models[name]
    assert not torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    safe = C.torch_load(path)
    unsafe = torch.load(path, map_location="cpu", weights_only=False)
    assert safe["kind"] == kind and safe.keys() == unsafe.keys()
    for k, v in safe["state_dict"].items():
        assert torch.equal(v, unsafe["state_dict"][k]), k
    ckpt = path.parent / "checkpoints" / f"{kind}_last.pt"
    assert not torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt))
    assert C.torch_load(ckpt)["step"] == 2
    loader = {"vae": LG.load_vae, "ldm": LG.load_ldm, "img": IG.load_generator}[name]
    net, payload = loader(path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in payload["state_dict"].items())


def test_ldm_training_conditioning_survives_the_round_trip(tiny_models):
    types, cond = LG.training_conditioning(tiny_models["ldm"])
    assert types == ["wmh", "tumour"] and cond.dtype == np.float32
    np.testing.assert_allclose(cond[:, 0], [0.0, 0.25, 0.5, 0.75])


# --------------------------------------------------------------------------- nnU-Net checkpoints


def _nnunet_checkpoint(extra_init_arg=None):
    """A dict shaped like ``nnUNetTrainer.save_checkpoint``'s, with the value types of a real
    ``checkpoint_final.pth`` (nnU-Net 2.8 on CPU): metrics and ``_best_ema`` are numpy float32
    scalars (means of float32 loss/Dice arrays), ``init_args['device']`` a ``torch.device``."""
    net = torch.nn.Conv3d(1, 2, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    net(torch.randn(1, 1, 4, 4, 4)).sum().backward()
    opt.step()
    f32 = np.float32
    init_args = {"plans": {"plans_name": "nnUNetPlans", "configurations": {}}, "configuration": "3d_fullres",
                 "fold": 0, "dataset_json": {"labels": {"background": 0, "ball": 1}}, "device": torch.device("cpu")}
    if extra_init_arg is not None:
        init_args["extra"] = extra_init_arg
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [f32(0.375)], "ema_fg_dice": [f32(0.375)],
                    "dice_per_class_or_region": [[f32(0.5), f32(0.25)]], "train_losses": [f32(-0.1)],
                    "val_losses": [f32(-0.2)], "lrs": [0.01], "epoch_start_timestamps": [1.0e9],
                    "epoch_end_timestamps": [1.0e9 + 3.5]},
        "_best_ema": f32(0.375),
        "current_epoch": 1,
        "init_args": init_args,
        "trainer_name": "nnUNetTrainerBrainsynth",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def test_nnunet_checkpoint_loads_with_a_minimal_allow_list(tmp_path):
    ref = _nnunet_checkpoint()
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ref, path)  # as nnU-Net's trainer does
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert unsafe == {"numpy._core.multiarray.scalar", "numpy.dtype"}  # what the allow-list is for
    with pytest.raises(InputError, match="numpy"):  # the generator loader allows no numpy
        C.torch_load(path)
    got = seg.load_nnunet_checkpoint(path)
    assert "numpy" not in str(torch.serialization.get_safe_globals()), "the allow-list must not outlive the call"
    assert got["trainer_name"] == "nnUNetTrainerBrainsynth" and got["init_args"]["configuration"] == "3d_fullres"
    assert got["init_args"]["device"] == torch.device("cpu")
    assert got["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert type(got["_best_ema"]) is np.float32 and got["_best_ema"] == 0.375
    assert got["logging"]["dice_per_class_or_region"] == [[0.5, 0.25]]
    for k, v in ref["network_weights"].items():
        assert torch.equal(got["network_weights"][k], v)
    assert torch.equal(got["optimizer_state"]["state"][0]["momentum_buffer"],
                       ref["optimizer_state"]["state"][0]["momentum_buffer"])


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's scalar reconstructor as numpy 1.x did (``numpy.core.multiarray.scalar``)."""

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "scalar" and obj.__module__ == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


class _Numpy1PickleModule:
    Pickler = _Numpy1Pickler
    Unpickler = pickle.Unpickler


def test_nnunet_checkpoint_written_under_numpy1_loads(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    ckpt = _nnunet_checkpoint()
    ckpt["_best_ema"] = np.float64(0.375)  # float64 where a metric was averaged over python floats
    torch.save(ckpt, path, pickle_module=_Numpy1PickleModule)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    got = seg.load_nnunet_checkpoint(path)
    assert type(got["_best_ema"]) is np.float64 and got["_best_ema"] == 0.375


def test_nnunet_loaders_refuse_code(tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    path = model / "fold_0" / "checkpoint_final.pth"
    path.parent.mkdir(parents=True)
    torch.save(_nnunet_checkpoint(extra_init_arg=_RunsCode(marker)), path)
    _assert_refused(seg.load_nnunet_checkpoint, path, marker, r"refused to load.*\.system")
    # the predictor path (seg.predict) loads through the same loader, before plans or network
    _assert_refused(lambda p: seg._initialize_predictor(None, model, None, "checkpoint_final.pth"), path, marker)
    # resuming nnU-Net training (--c) reads the checkpoint through the same loader
    from brainsynth.nnunet_trainers import nnUNetTrainerBrainsynth

    trainer = object.__new__(nnUNetTrainerBrainsynth)  # loading comes before any use of the trainer
    _assert_refused(lambda p: trainer.load_checkpoint(str(p)), path, marker)
    arr = _nnunet_checkpoint(extra_init_arg=np.zeros(3))  # numpy arrays are not on the allow-list
    torch.save(arr, path)
    _assert_refused(seg.load_nnunet_checkpoint, path, marker, "refused to load.*ndarray")


def test_nnunet_loader_rejects_non_checkpoints(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(InputError, match="not an nnU-Net v2 checkpoint"):
        seg.load_nnunet_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        seg.load_nnunet_checkpoint(path)
    with pytest.raises(InputError, match="does not exist"):
        seg.load_nnunet_checkpoint(tmp_path / "missing.pth")
