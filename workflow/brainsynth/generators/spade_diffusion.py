"""Images from label maps by a SPADE-normalised diffusion model (semantic-mask diffusion).

An alternative image generator for the label generator's maps: MONAI's
``SPADEDiffusionModelUNet`` denoises an axial slice whose normalisation layers are modulated
by the slice's probabilistic label map (SPADE), with the modality as a class embedding, so one
model draws T1, T2 and FLAIR. DDPM training (v prediction in the demo, the tutorials' epsilon in
``PAPER``; L2), DDIM sampling; no style
image: the contrast is the model's learnt one per modality. Sampling is deterministic per seed.

:func:`train_spade_diffusion` trains on the brain slices of the generators' training subjects
(checkpointed and resumable like the other generators); :func:`sample_spade_diffusion` images
a sample set's label maps into the synthetic-sample contract (``contract``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..io import save_nifti, save_table
from . import common as C
from .contract import check_samples, write_montage

log = logging.getLogger("brainsynth.generators.spade_diffusion")

DEFAULTS = {
    "device": "auto",
    "seed": 0,
    "num_threads": None,
    "amp": True,
    "steps": 1500,
    "batch_size": 8,
    "lr": 2.5e-4,
    # the full-resolution level holds most of the compute (its SPADE convolutions above all):
    # 16 channels there and 16 in the SPADE branch halve sampling and training time on a CPU
    # against 32 / 32 (0.83 vs 1.99 s per forward of 38 slices at 48x56, 2026-12-04)
    "channels": [16, 32, 64],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "num_head_channels": 16,
    "spade_intermediate_channels": 16,
    "num_train_timesteps": 1000,
    # v, not the study's epsilon: after a demo-length training epsilon prediction draws pure
    # noise (its x0 estimate at high noise divides by sqrt(alpha_bar)), as the label LDM found
    "prediction_type": "v_prediction",
    "inference_steps": 25,
    "checkpoint_every": 50,
    "log_every": 25,
    "min_brain_voxels": 1,
}

# Paper-scale network and budget for 2 mm slices (96x128): the widths, attention levels and
# residual blocks of MONAI's SPADE latent-diffusion brain tutorial, in pixel space.
PAPER = {
    "steps": 50000,
    "batch_size": 32,
    "lr": 1e-4,
    "channels": [64, 128, 256],
    "attention_levels": [False, True, True],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "num_head_channels": 32,
    "spade_intermediate_channels": 128,
    "prediction_type": "epsilon",
    "inference_steps": 50,
    "checkpoint_every": 1000,
    "log_every": 250,
}


def resolve_config(cfg):
    cfg = C.resolve_preset(DEFAULTS, PAPER, cfg, where="spade_diffusion")
    C.check_choice(cfg["prediction_type"], C.PREDICTION_TYPES, "spade_diffusion.prediction_type")
    return cfg


def _net(cfg, n_classes, n_modalities):
    from monai.networks.nets import SPADEDiffusionModelUNet

    return SPADEDiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, label_nc=n_classes,
        channels=list(cfg["channels"]), attention_levels=list(cfg["attention_levels"]),
        num_res_blocks=int(cfg["num_res_blocks"]), norm_num_groups=int(cfg["norm_num_groups"]),
        num_head_channels=int(cfg["num_head_channels"]), num_class_embeds=n_modalities,
        spade_intermediate_channels=int(cfg["spade_intermediate_channels"]))


def train_spade_diffusion(label_paths, image_paths, cfg, out_dir, *, max_steps_this_run=None, callback=None):
    """Train on axial brain slices. ``label_paths``: probabilistic maps; ``image_paths``:
    modality -> paths aligned with them. Returns the output paths of :func:`common.finish_training`."""
    from monai.networks.schedulers import DDPMScheduler

    cfg = resolve_config(cfg)
    C.set_threads(cfg["num_threads"])
    device = C.get_device(cfg["device"])
    amp = C.amp_enabled(device, cfg["amp"])
    C.seed_everything(cfg["seed"])
    cohort = C.Cohort(label_paths, image_paths, min_brain_voxels=int(cfg["min_brain_voxels"]))
    n_classes, modalities = cohort.labels.shape[1], cohort.modalities
    padded = C.divisible_shape(cohort.shape[:2], 2 ** (len(cfg["channels"]) - 1))
    slices = [(i, int(z)) for i, zs in enumerate(cohort.brain) for z in zs]
    log.info("spade diffusion: %d subjects, %d brain slices, modalities %s, %d classes, slice %s (padded %s), "
             "device %s", len(cohort), len(slices), modalities, n_classes, cohort.shape[:2], padded, device)
    net = _net(cfg, n_classes, len(modalities)).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=int(cfg["num_train_timesteps"]),
                              prediction_type=cfg["prediction_type"])
    opt = torch.optim.Adam(net.parameters(), lr=float(cfg["lr"]))
    scaler = C.make_scaler(device, amp)
    # draws from numpy's global state, seeded above and saved / restored with each checkpoint, so a
    # resumed run continues the uninterrupted run's draws
    rng = np.random

    def step_fn(step):
        pick = rng.randint(len(slices), size=int(cfg["batch_size"]))
        mods = rng.randint(len(modalities), size=pick.size)
        seg = np.stack([cohort.labels[slices[k][0], ..., slices[k][1]] for k in pick])
        img = np.stack([cohort.images[slices[k][0], m, ..., slices[k][1]] for k, m in zip(pick, mods)])[:, None]
        seg = C.pad_background(torch.from_numpy(seg.astype(np.float32)), padded).to(device)
        x0 = C.pad_to(torch.from_numpy(img.astype(np.float32)) * 2 - 1, padded, value=-1.0).to(device)
        noise = torch.randn_like(x0)
        t = torch.from_numpy(rng.randint(scheduler.num_train_timesteps, size=pick.size)).long().to(device)
        with C.autocast(device, amp):
            pred = net(scheduler.add_noise(x0, noise, t), t, seg=seg,
                       class_labels=torch.from_numpy(mods).long().to(device))
            loss = F.mse_loss(pred.float(), C.diffusion_target(scheduler, cfg["prediction_type"], x0, noise, t))
        C.optimizer_step(loss, opt, scaler)
        return {"mse": loss.item()}

    training_cfg = {k: v for k, v in cfg.items() if k != "inference_steps"}  # a sampling setting
    fingerprint = C.config_hash(C.training_fingerprint_config(training_cfg), C.files_fingerprint(
        list(label_paths) + [p for ps in image_paths.values() for p in ps]))
    history, completed, _ = C.train_loop(
        name="spade_diffusion", total_steps=int(cfg["steps"]), step_fn=step_fn, modules={"net": net},
        optimizers={"opt": opt}, scalers={"scaler": scaler}, out_dir=out_dir, fingerprint=fingerprint,
        checkpoint_every=int(cfg["checkpoint_every"]), log_every=int(cfg["log_every"]),
        max_steps_this_run=max_steps_this_run, callback=callback, device=device)
    if not completed:
        return {"completed": False}
    payload = {"state_dict": C.state_dict_cpu(net), "config": cfg, "n_classes": int(n_classes),
               "modalities": list(modalities), "slice_shape": list(cohort.shape[:2]), "padded_shape": list(padded)}
    return C.finish_training("spade_diffusion", out_dir, payload, cfg, history,
                             f"SPADE diffusion ({cfg['prediction_type']} MSE)")


def load_model(path, device):
    payload = C.torch_load(path, map_location="cpu", what="SPADE diffusion model")
    net = _net(payload["config"], payload["n_classes"], len(payload["modalities"]))
    net.load_state_dict(payload["state_dict"])
    return C.guard_bf16_inference(net.to(device).eval(), "SPADE diffusion"), payload


@torch.no_grad()
def generate_volume(net, payload, prob_label, modality, seed, *, steps=None, device="cpu", batch_size=16):
    """``(X, Y, Z)`` image in [0, 1] of ``modality`` for a ``(K, X, Y, Z)`` probabilistic map:
    DDIM from seeded noise, slice by slice; background 0."""
    from monai.networks.schedulers import DDIMScheduler

    cfg = payload["config"]
    if modality not in payload["modalities"]:
        raise InputError(f"modality {modality} was not trained (trained: {payload['modalities']})",
                         field="modalities", fix="train the model on every modality it should draw")
    lab = np.asarray(prob_label, dtype=np.float32)
    if lab.shape[0] != payload["n_classes"] or list(lab.shape[1:3]) != list(payload["slice_shape"]):
        raise InputError(f"label map {lab.shape} does not match the model's (K={payload['n_classes']}, "
                         f"slice {payload['slice_shape']})", field="label map",
                         fix="sample on the grid the model was trained on")
    # models trained before prediction_type was a setting predicted epsilon
    scheduler = DDIMScheduler(num_train_timesteps=int(cfg["num_train_timesteps"]),
                              prediction_type=cfg.get("prediction_type", "epsilon"))
    scheduler.set_timesteps(int(steps or cfg["inference_steps"]))
    amp = C.sampling_amp(device, cfg.get("amp", False))
    m = payload["modalities"].index(modality)
    padded = payload["padded_shape"]
    zs = C.brain_slices(lab, min_brain_voxels=1)
    gen = C.generator(int(seed) * 131 + m)
    vol = np.zeros(lab.shape[1:], dtype=np.float32)
    for b0 in range(0, len(zs), batch_size):
        zb = zs[b0:b0 + batch_size]
        seg = C.pad_background(torch.from_numpy(np.ascontiguousarray(np.moveaxis(lab[..., zb], -1, 0))), padded)
        seg = seg.to(device)
        x = torch.randn((len(zb), 1, *padded), generator=gen).to(device)
        cls = torch.full((len(zb),), m, dtype=torch.long, device=device)
        for t in scheduler.timesteps:
            with C.autocast(device, amp):
                eps = net(x, torch.full((len(zb),), int(t), dtype=torch.long, device=device), seg=seg,
                          class_labels=cls).float()
            x, _ = scheduler.step(eps, t, x)
        x = C.crop_to(x.float().cpu(), lab.shape[1:3])[:, 0].numpy()
        vol[..., zb] = np.moveaxis(np.clip((x + 1) / 2, 0, 1), 0, -1)
    vol[lab[0] >= 0.5] = 0.0
    return vol


def sample_spade_diffusion(*, model, label_paths, out_dir, modalities, seed=0, steps=None, device="auto",
                           montage=True):
    """Images of every modality for the probabilistic maps ``{id: labelprob path}``; writes the
    sample contract (labels as argmax) and returns the manifest."""
    out_dir = Path(out_dir)
    dev = C.get_device(device)
    net, payload = load_model(model, dev)
    missing = [p for p in label_paths.values() if not Path(p).exists()]
    if missing:
        raise InputError(f"{len(missing)} label map(s) missing", file=missing[0],
                         fix="run the label generator's sampling first")
    rows, montage_rows = [], []
    for i, (sid, path) in enumerate(label_paths.items()):
        nii = nib.load(str(path))
        prob = np.moveaxis(np.asarray(nii.dataobj, dtype=np.float32), -1, 0)
        hard = np.argmax(prob, axis=0).astype(np.uint8)
        sdir = out_dir / "samples" / sid
        save_nifti(hard, nii.affine, sdir / "label.nii.gz", dtype=np.uint8)
        images = {m: generate_volume(net, payload, prob, m, int(seed) * 1000 + i, steps=steps, device=dev)
                  for m in modalities}
        for m in modalities:
            save_nifti(images[m], nii.affine, sdir / f"{m}.nii.gz", dtype=np.float32)
        rows.append({"subject": sid, "seed": int(seed), "generator": "spade_diffusion",
                     "inference_steps": int(steps or payload["config"]["inference_steps"])})
        montage_rows.append((sid, hard, images))
        log.info("spade diffusion sample %d/%d: %s", i + 1, len(label_paths), sid)
    manifest = pd.DataFrame(rows)
    save_table(manifest, out_dir / "manifest.tsv")
    if montage:
        write_montage(montage_rows, list(modalities), payload["n_classes"], out_dir / "montage.png")
    check_samples(out_dir, list(label_paths), modalities, "spade_diffusion")
    return manifest
