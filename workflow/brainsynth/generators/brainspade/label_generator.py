"""Label generator: a KL autoencoder over probabilistic label maps + a conditioned latent diffusion model.

Public API
----------
``train_label_vae(label_paths, cfg, out_dir, ...) -> dict of output paths``
    monai ``AutoencoderKL`` over the ``K``-channel probabilistic maps (3-D, or
    axial 2-D slices with ``spatial_dims: 2``). The decoder output is a logit per
    class; ``softmax`` over channels gives the probabilistic map. Loss: focal (or dice_ce)
    reconstruction on the softmax output (monai ``FocalLoss(use_softmax=True)``,
    soft targets) + ``kl_weight`` * KL + after ``adv_warmup_steps`` a
    least-squares adversarial loss from a monai ``PatchDiscriminator``
    (``PatchAdversarialLoss(criterion="least_squares")``) + optional perceptual
    loss (only with a local weights file).
``train_label_ldm(vae_path, label_paths, cond_table, cfg, out_dir, ...) -> dict``
    latents of the frozen VAE (posterior means by default, see ``ldm.latents``),
    standardised per channel (or scaled by one ``1/std`` as in the MONAI
    tutorials, ``ldm.latent_norm: global``), padded so
    each spatial size is divisible by ``2**(len(ldm.channels)-1)``; monai
    ``DiffusionModelUNet(with_conditioning=True, cross_attention_dim=context_dim)``
    conditioned (cross-attention) on the vector ``dc_jl`` of the lesion types plus a flag
    "conditioned" as a sequence of length 1 ``(B, 1, n_types + 1)`` (with ``ldm.lesion_presence``
    also a 0/1 flag per lesion type, ``(B, 1, 2 n_types + 1)``); the flags and ``dc`` are
    zeroed for ``ldm.condition_dropout`` of the training samples (the null context of
    classifier-free guidance: ``dc = 0`` alone means "healthy", not "unconditioned"); L2 loss on epsilon (the study), v or x0
    (``ldm.prediction_type``),
    ``DDPMScheduler`` training.
``sample_labels(vae_path, ldm_path, conditioning, scheduler="ddim", steps=None, seed=0, ...)``
    ``(N, n_types)`` conditioning -> ``(N, K, *spatial)`` float32 probabilistic maps
    (softmax, sum to 1), cropped back to the working grid. Deterministic for a
    given seed (and batch size).
``resolve_unrequested_lesions(probs, conditioning, lesion_types, schema, setting)``
    each map's lesion classes resolved by its request (``sampling.unrequested_lesions``):
    the classes of lesion types it does not ask for removed, and the voxels the decoder
    gave them counted per map.
``remove_unrequested_logits(logits, conditioning, lesion_types, schema, setting)``
    the same removal on logits (-inf), for the fits that work on them.
``make_conditioning(mode, n, lesion_types, train_values=None, values=None, seed=0)``
    ``explicit`` (given values), ``random`` (rows drawn from the training
    distribution of ``dc_jl``), ``unseen`` (every lesion type > 0 at once, each
    drawn from its non-zero training values: combinations absent from training,
    e.g. WMH and tumour together), ``healthy`` (all zero).
``training_conditioning(ldm_path) -> (lesion_types, values)``

Conditioning table (TSV): columns ``subject`` and ``dc_<lesion type>`` (lesion
voxel count / dataset maximum, in [0, 1]); the lesion types are the ``dc_``
columns in table order. In 2-D mode the conditioning is per slice: the soft
lesion voxel count of the slice divided by its training-set maximum (the
normalisers are stored in the model).

Config (``label_generator:`` in config.yaml; defaults in :data:`DEFAULTS`)
--------------------------------------------------------------------------
==============================  ===========================================================
key                             meaning
==============================  ===========================================================
spatial_dims                    3 (volumes) or 2 (axial slices)
device                          auto | cpu | cuda[:i]
amp                             mixed precision: training and sampling in float16 on CUDA, in bfloat16 on
                                CPUs with AMX, where it beats float32 (common.cpu_bf16_fast; training only
                                where every convolution passes common.bf16_convolution_problem); false: float32
seed                            training seed (torch, numpy, random)
num_threads                     torch CPU threads (null: $OMP_NUM_THREADS or 1)
checkpoint_every / log_every    steps between checkpoints / progress lines
vae.channels                    AutoencoderKL channels per level (downsampling len-1 times)
vae.num_res_blocks              residual blocks per level
vae.attention_levels            self-attention per level (list of bool, len = channels)
vae.with_nonlocal_attn          mid-block attention in encoder and decoder
vae.latent_channels             latent channels
vae.norm_num_groups             GroupNorm groups (must divide every channel count)
vae.patch_size                  null (whole maps) or random crops of this size (the VAE is fully
                                convolutional: latents of whole maps are encoded after training)
vae.steps / vae.batch_size      optimisation steps / volumes (or slices) per step
vae.lr / vae.disc_lr            Adam learning rates of autoencoder / discriminator
vae.lr_schedule                 constant | cosine (both rates decay to 0 at the last step)
vae.select_every                > 0: every this many steps (and at the last) the whole training maps are
                                encoded (posterior mean), decoded and scored (mean over classes of Dice
                                after argmax, pooled over the maps, so lesion voxels decoded where there
                                are none count against it); the model kept is the best-scoring one, not
                                the last. 0: the last weights
vae.reconstruction_loss         focal (the study) | dice_ce (soft-target cross-entropy + soft Dice)
vae.reconstruction_target       soft: the probabilistic map | argmax: the one-hot map of its argmax, the class
                                each voxel is counted as (a soft target barely penalises losing the 4 mm grid's
                                thin, fragmented CSF, whose voxels are only moderately sure) |
                                argmax_outside_lesions: one-hot except in voxels with any lesion probability,
                                which keep the soft map
vae.focal_gamma                 focal loss gamma
vae.class_weighting             focal-loss class weights: inverse_sqrt_frequency (rare classes such as
                                lesions count more) or none
vae.rare_class_oversample       share of patches centred on a voxel of a rare class (< 1% of the
                                training voxels; nnU-Net's foreground oversampling); 0: uniform
vae.kl_weight                   weight of the KL term
vae.posterior_sigma_init        null: MONAI's initialisation (posterior sigma ~1); a value: the log-variance
                                head starts at this sigma, so the decoder sees nearly noise-free latents
                                from the first step instead of after a long training
vae.adv_weight                  weight of the adversarial term (0 disables the GAN)
vae.adv_warmup_steps            steps before the discriminator is switched on
vae.disc_channels / disc_layers PatchDiscriminator width / depth
vae.perceptual_weight           > 0 enables the perceptual loss ...
vae.perceptual_weights_path     ... only with this local ResNet-50 state dict (never downloaded)
ldm.channels                    DiffusionModelUNet channels per level
ldm.num_res_blocks              residual blocks per level
ldm.attention_levels            cross/self-attention per level (the mid block always has it)
ldm.num_head_channels           channels per attention head
ldm.norm_num_groups             GroupNorm groups
ldm.transformer_num_layers      transformer layers per attention block
ldm.num_train_timesteps         diffusion steps T
ldm.schedule / beta_start / beta_end   noise schedule (monai scheduler names)
ldm.prediction_type             epsilon (the study; needs long training: its x0 estimate at high noise
                                divides by sqrt(alpha_bar)) | v_prediction (demo default: usable
                                samples after a few hundred steps) | sample; L2 loss on that target
ldm.latents                     mean: the VAE posterior means (robust when the VAE is briefly
                                trained and its posterior sigma is still ~1) | sample: mu + sigma*eps
                                (MONAI tutorials' encode_stage_2_inputs)
ldm.latent_norm                 global: latents x 1/std (MONAI tutorials) | channel: per-channel
                                (z - mean_c) / std_c (removes the offsets an eps-predicting model
                                must otherwise reproduce to 1/sqrt(alpha_bar) precision at high t) |
                                residual: (z - mean latent, per voxel) / std_c of the residuals: the
                                LDM draws each map's departure from the training maps' mean latent,
                                its noise on the scale of how subjects differ, not of the anatomy
ldm.lesion_weight               L2 loss weight 1 + this on latent voxels over a lesion (0: plain L2);
                                a mapping {lesion type: weight} weighs each type on its own
                                (types left out: 0), e.g. {wmh: 10, tumour: 0}
ldm.condition_channels          also append the context as constant input channels of the UNet (a direct
                                path for the conditioning besides cross-attention)
ldm.lesion_presence             also give the context a 0/1 flag per lesion type (dc > 0). Cross-attention
                                over one context token is linear in the context, so without it a small
                                lesion's request is a scaled-down large one and the smallest training
                                lesions come out as a few voxels; false: dc alone (the study)
ldm.condition_dropout           share of training steps' samples whose conditioning is replaced by the
                                null context (classifier-free guidance; 0: conditioned always)
ldm.ema_decay                   > 0: sample from the exponential moving average of the UNet's weights
                                (decay per step, with warm-up); 0: from the last weights
ldm.steps / ldm.batch_size / ldm.lr    optimisation steps / latents per step / Adam lr
ldm.patch_size                  p: the U-Net sees each p^d block of latent voxels as channels and runs on a
                                grid p times coarser per axis (1: on the latent grid); for a VAE whose
                                latent keeps the working grid (vae.channels of one level), whose LDM would
                                otherwise cost about ten times as much per step (latent_patches)
calibration                     none | tissue | all: per-class offsets added to the decoder's logits, fitted
                                on the training maps after training (rule calibrate_label_vae; coordinate
                                ascent of the selection's score), used by sampling and the audit: the VAE
                                spreads a thin class's probability (the 4 mm CSF rim) over its neighbours,
                                so the class loses the argmax it should win. tissue: background and tissue
                                classes (lesions keep the size their conditioning asks for); all: every class.
                                With the offsets, one temperature dividing the logits, fitted so that the
                                decoded probabilities match the training maps' (soft cross-entropy): it moves
                                no argmax; a decoder trained on argmax targets draws near one-hot maps
sampling.scheduler              ddpm (all T steps) | ddim
sampling.inference_steps        DDIM steps (ignored by ddpm)
sampling.ddim_eta               DDIM eta (0: deterministic given the initial noise)
sampling.batch_size             samples decoded at once
sampling.clip_x0                clip the predicted x0 at every step to the range of the scaled
                                training latents (+ clip_margin x range): keeps briefly trained
                                models from diverging at high noise levels
sampling.clip_margin            margin of that range, as a fraction of it
sampling.guidance_scale         classifier-free guidance w: prediction = uncond + w (cond - uncond);
                                1: conditioned model alone (no extra pass), > 1 follows dc harder
sampling.compose_lesion_types   a request for several lesion types at once is sampled as the composition of
                                each type alone (composable diffusion): uncond + w (healthy - uncond) +
                                w sum_j (type j alone - healthy); 2 + n_types passes per step for such batches
sampling.negate_unrequested     every request is sampled by that composition, each lesion type it
                                does not ask for subtracted (composable diffusion's NOT): - w (type j
                                at its typical dc - healthy), typical = the median dc of the training
                                maps holding type j; 2 + n_types passes per step for every batch
sampling.compose_weight         multiplier of w for each lesion type's term in a composed request (a number
                                for all, or {type: k}): uncond + w (healthy - uncond) + w sum_j k_j (type j
                                alone - healthy); 1: composable diffusion as published; fit: k_j fitted
                                per trained model so that a composed request draws type j as large as
                                a request for type j alone (compose_fit, rule fit_compose_weight)
sampling.unrequested_lesions    keep: the decoded maps as they are; remove: the classes of every lesion type
                                a request does not ask for (dc = 0) get probability 0 and the rest is
                                renormalised, as brainSPADE's sampler assigns its lesion channel by the
                                request; the decoder's voxels of such classes are counted either way
==============================  ===========================================================
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ...errors import InputError
from ...io import save_json
from ...labels import LabelSchema, check_conditioning_mode, single_type_of
from .. import common as C
from .latent_patches import PatchedUNet
from . import settings
from .deformation import conditioning_phenotypes, deform, load_deformation, map_stds

log = logging.getLogger("brainsynth.generators.label")

DEFAULTS = {  # demo scale: 48x56x48 grid, trains on 2 CPU cores in minutes
    "spatial_dims": 3,
    "device": "auto",
    "amp": True,
    "seed": 0,
    "num_threads": None,
    "checkpoint_every": 50,
    "log_every": 10,
    # 8 latent channels at 1/2 resolution (24x28x24x8, 8 mm latent voxels as the study's 1/4 of
    # 2 mm): at 1/4 of the 4 mm grid (12x14x12x3) held-out CSF reconstructed at Dice 0.34
    "vae": {
        "channels": [16, 32],
        "num_res_blocks": 1,
        "attention_levels": [False, False],
        "with_nonlocal_attn": False,
        "latent_channels": 8,
        "norm_num_groups": 8,
        "patch_size": [32, 32, 32],
        "steps": 200,
        "batch_size": 2,
        "lr": 1e-3,
        "disc_lr": 1e-3,
        "lr_schedule": "constant",
        "select_every": 0,
        "reconstruction_loss": "dice_ce",
        "reconstruction_target": "soft",
        "focal_gamma": 2.0,
        "class_weighting": "none",
        "rare_class_oversample": 0.5,
        "kl_weight": 1e-6,
        "posterior_sigma_init": None,
        "adv_weight": 0.0,  # a label GAN gave no gain within the demo's budget (README)
        "adv_warmup_steps": 100,
        "disc_channels": 8,
        "disc_layers": 2,
        "perceptual_weight": 0.0,
        "perceptual_weights_path": None,
    },
    "ldm": {
        "channels": [16, 32, 32],
        "num_res_blocks": 1,
        "attention_levels": [False, False, True],
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "transformer_num_layers": 1,
        "num_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "prediction_type": "v_prediction",
        "beta_start": 0.0015,
        "beta_end": 0.0205,
        "latents": "mean",
        "latent_norm": "channel",
        "condition_dropout": 0.15,
        "condition_channels": False,
        "lesion_presence": False,
        "lesion_weight": 0.0,
        "ema_decay": 0.0,
        "patch_size": 1,
        "steps": 500,
        "batch_size": 4,
        "lr": 5e-4,
    },
    "calibration": "none",
    "sampling": {
        "scheduler": "ddim",
        "inference_steps": 25,
        "ddim_eta": 0.0,
        "batch_size": 4,
        "clip_x0": True,
        "clip_margin": 0.05,
        "guidance_scale": 1.0,
        "compose_lesion_types": False,
        "negate_unrequested": False,
        "compose_weight": 1.0,
        "unrequested_lesions": "keep",
        "tissue_offsets": "none",  # fit: tissue offsets at sampling, fitted per model (tissue_fit)
        "deformation": "none",  # fit: each map warped by a random smooth field of a fitted size (deformation)
    },
}

# Paper scale (96x128x96 at 2 mm, one GPU): overrides of DEFAULTS. The autoencoder is the
# study's (brainSPADE3D label_ldm/ldm_configs/autoencoder3d.yaml: channels 16/32/64, 2 residual
# blocks, 8 latent channels at 1/4 resolution = 24x32x24x8, focal + adversarial 0.01 +
# perceptual); step counts are budgets, not values taken from the paper.
PAPER = {
    "vae": {"channels": [16, 32, 64], "num_res_blocks": 2, "norm_num_groups": 16, "latent_channels": 8,
            "patch_size": [64, 64, 64], "steps": 50000, "batch_size": 2, "lr": 2e-4, "disc_lr": 1e-4,
            "reconstruction_loss": "focal", "adv_weight": 0.01, "adv_warmup_steps": 5000,
            "attention_levels": [False, False, False],
            "disc_channels": 16, "disc_layers": 3, "perceptual_weight": 0.001},
    "ldm": {"channels": [64, 128, 256], "num_res_blocks": 2, "attention_levels": [False, True, True],
            "num_head_channels": [0, 64, 64], "norm_num_groups": 32, "latents": "sample", "steps": 100000,
            "prediction_type": "epsilon",
            "batch_size": 8,
            "lr": 2.5e-5},
    "sampling": {"scheduler": "ddim", "inference_steps": 100, "batch_size": 4},
}


def resolve_config(cfg):
    return C.resolve_preset(DEFAULTS, PAPER, cfg, where="label_generator")


def precision_notice(cfg):
    """What a run should be told before the label generator trains on this machine, or None:
    with ``amp`` on a CPU without AMX (where bfloat16 is slower than float32) it trains in float32,
    several times slower than on the AMX CPU the demo's training budgets were set on (README,
    Timings)."""
    cfg = resolve_config(cfg)
    try:
        device = C.get_device(cfg["device"])
    except InputError:
        return None  # the training rule refuses the device, naming the field
    if not cfg["amp"] or device.type != "cpu" or C.cpu_bf16_fast():
        return None
    return ("this CPU has no AMX units, where bfloat16 beats float32: the label generator trains in float32, "
            "several times slower than on a CPU that has them (README, Timings)")


# --------------------------------------------------------------------------- networks


def _vae_kwargs(cfg, n_classes):
    v = cfg["vae"]
    ch = list(v["channels"])
    att = list(v["attention_levels"])
    if len(att) != len(ch):
        raise InputError(f"vae.attention_levels has {len(att)} entries for {len(ch)} channels",
                         field="label_generator.vae.attention_levels", fix="give one bool per level")
    return dict(
        spatial_dims=int(cfg["spatial_dims"]),
        in_channels=n_classes,
        out_channels=n_classes,
        channels=ch,
        num_res_blocks=int(v["num_res_blocks"]),
        attention_levels=att,
        latent_channels=int(v["latent_channels"]),
        norm_num_groups=int(v["norm_num_groups"]),
        with_encoder_nonlocal_attn=bool(v["with_nonlocal_attn"]),
        with_decoder_nonlocal_attn=bool(v["with_nonlocal_attn"]),
    )


def context_dim(n_types, presence):
    """Length of the context vector: dc per lesion type, the "conditioned" flag and, with
    ``presence``, a 0/1 flag per lesion type."""
    return int(n_types) * (2 if presence else 1) + 1


def _unet_kwargs(cfg, latent_channels, n_types):
    """The U-Net's keyword arguments on the latent grid; with ``ldm.patch_size`` > 1 they carry
    ``patch_size`` and :func:`build_unet` widens the channels to the blocks."""
    m = cfg["ldm"]
    dim = context_dim(n_types, m["lesion_presence"])
    extra = dim if m["condition_channels"] else 0
    patch = {"patch_size": int(m["patch_size"])} if int(m["patch_size"]) > 1 else {}
    return dict(
        **patch,
        spatial_dims=int(cfg["spatial_dims"]),
        in_channels=latent_channels + extra,
        out_channels=latent_channels,
        channels=list(m["channels"]),
        num_res_blocks=int(m["num_res_blocks"]),
        attention_levels=list(m["attention_levels"]),
        num_head_channels=(int(m["num_head_channels"]) if np.isscalar(m["num_head_channels"])
                           else [int(c) for c in m["num_head_channels"]]),
        norm_num_groups=int(m["norm_num_groups"]),
        transformer_num_layers=int(m["transformer_num_layers"]),
        with_conditioning=True,
        cross_attention_dim=dim,
    )


def _scheduler_kwargs(cfg):
    m = cfg["ldm"]
    C.check_choice(m["prediction_type"], C.PREDICTION_TYPES, "label_generator.ldm.prediction_type")
    return dict(num_train_timesteps=int(m["num_train_timesteps"]), schedule=m["schedule"],
                beta_start=float(m["beta_start"]), beta_end=float(m["beta_end"]),
                prediction_type=m["prediction_type"])


def build_vae(kwargs):
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(**kwargs)


def build_unet(kwargs):
    from monai.networks.nets import DiffusionModelUNet

    kw = dict(kwargs)
    p = int(kw.pop("patch_size", 1))
    if p == 1:
        return DiffusionModelUNet(**kw)
    block = p ** int(kw["spatial_dims"])
    kw["in_channels"], kw["out_channels"] = kw["in_channels"] * block, kw["out_channels"] * block
    return PatchedUNet(DiffusionModelUNet(**kw), p)


def build_scheduler(kind, kwargs, clip_range=None):
    """DDPM/DDIM scheduler. ``clip_range`` ``(lo, hi)`` clips the predicted x0 to the range of
    the (scaled) training latents; ``None``: no clipping (MONAI's default [-1, 1] does not
    fit unit-variance latents)."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    clip = {"clip_sample": False}
    if clip_range is not None:
        clip = {"clip_sample": True, "clip_sample_min": float(clip_range[0]),
                "clip_sample_max": float(clip_range[1])}
    if kind == "ddpm":
        return DDPMScheduler(**clip, **kwargs)
    if kind == "ddim":
        return DDIMScheduler(**clip, **kwargs)
    raise InputError(f"unknown scheduler {kind!r}", field="label_generator.sampling.scheduler",
                     fix="use ddpm or ddim")


def load_vae(path, device="cpu", calibration=None):
    """The label VAE of a model file (eval mode) and its payload; ``calibration``: the JSON of
    :func:`calibrate_label_vae`, whose class offsets and temperature the decoder's logits then get
    (:func:`decoded_logits`)."""
    payload = C.torch_load(path)
    if payload.get("kind") != "label_vae":
        raise InputError("not a label VAE model file", file=path, fix="pass the output of train_label_vae")
    vae = build_vae(payload["vae_kwargs"])
    vae.load_state_dict(payload["state_dict"])
    offsets, temperature = load_calibration(calibration, payload["n_classes"])
    if offsets is not None:
        vae.class_offsets = offsets
    if temperature != 1.0:
        vae.class_temperature = temperature
    return C.guard_bf16_inference(vae.to(device).eval(), "label VAE"), payload


def load_ldm(path, device="cpu"):
    payload = C.torch_load(path)
    if payload.get("kind") != "label_ldm":
        raise InputError("not a label LDM model file", file=path, fix="pass the output of train_label_ldm")
    unet = build_unet(payload["unet_kwargs"])
    unet.load_state_dict(payload["state_dict"])
    return C.guard_bf16_inference(unet.to(device).eval(), "label LDM"), payload


def _channelwise_perceptual(perc, pred, target):
    """Perceptual loss of ``K``-channel maps: mean over channels of 1-channel losses."""
    return torch.stack([perc(pred[:, c:c + 1].float(), target[:, c:c + 1].float())
                        for c in range(pred.shape[1])]).mean()


def _fingerprint_cfg(cfg, part):
    """The settings a ``part`` (vae | ldm) training step depends on (the number of steps too when
    the learning rate is scheduled over them)."""
    out = C.training_fingerprint_config({"spatial_dims": cfg["spatial_dims"], "seed": cfg["seed"],
                                         "amp": cfg["amp"], part: cfg[part]})
    if cfg[part].get("lr_schedule", "constant") != "constant":
        out["scheduled_steps"] = int(cfg[part]["steps"])
    return out


def kl_loss(z_mu, z_sigma):
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


# --------------------------------------------------------------------------- data


def _training_maps(label_paths, spatial_dims, n_classes=None):
    """-> (tensor (N, K, *spatial), original spatial shape, slice index); 2-D: brain slices stacked."""
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}", field="label_generator.spatial_dims")
    cohort = C.Cohort(label_paths, n_classes=n_classes, dtype=np.float16)  # float16: half the memory
    if spatial_dims == 3:
        return torch.from_numpy(cohort.labels), cohort.shape, None
    slices, index = cohort.label_slices()
    return torch.from_numpy(slices), cohort.shape[:2], index


def _levels_factor(n_levels):
    return 2 ** (max(1, int(n_levels)) - 1)


def subject_of_path(path, subjects):
    """The subject id among ``subjects`` whose name starts the file name (longest match)."""
    name = Path(path).name
    best = None
    for s in subjects:
        s = str(s)
        if name.startswith(s) and (len(name) == len(s) or not name[len(s)].isalnum()):
            if best is None or len(s) > len(best):
                best = s
    return best


def load_conditioning_table(cond_table):
    """Path or DataFrame -> (DataFrame, lesion types from the ``dc_`` columns)."""
    if isinstance(cond_table, pd.DataFrame):
        df = cond_table.copy()
    else:
        p = Path(cond_table)
        if not p.exists():
            raise InputError("conditioning table not found", file=p, fix="run the preprocessing stage")
        df = pd.read_csv(p, sep="\t", dtype={"subject": str})
    if "subject" not in df.columns:
        raise InputError("conditioning table has no 'subject' column", file=cond_table)
    types = [c[3:] for c in df.columns if c.startswith("dc_")]
    if not types:
        raise InputError("conditioning table has no dc_<lesion type> column", file=cond_table,
                         fix="add columns dc_wmh, dc_tumour, ...")
    vals = df[[f"dc_{t}" for t in types]].to_numpy(dtype=float)
    if not np.isfinite(vals).all() or vals.min() < 0 or vals.max() > 1:
        raise InputError("dc_ values must be finite and in [0, 1]", file=cond_table,
                         fix="recompute the conditioning table")
    df["subject"] = df["subject"].astype(str)
    return df, types


def _subject_conditioning(label_paths, df, types, subjects=None):
    if subjects is None:
        subjects = []
        for p in label_paths:
            s = subject_of_path(p, df["subject"])
            if s is None:
                raise InputError("no row of the conditioning table matches this label map", file=p,
                                 fix="the file name must start with the subject id of the table")
            subjects.append(s)
    rows = df.set_index("subject")
    missing = [s for s in subjects if s not in rows.index]
    if missing:
        raise InputError(f"subjects {missing} missing from the conditioning table", fix="regenerate the table")
    return np.stack([rows.loc[s, [f"dc_{t}" for t in types]].to_numpy(dtype=np.float32) for s in subjects]), subjects


def _slice_conditioning(maps2d, types, schema):
    """Per-slice soft lesion counts / training maximum."""
    counts = []
    for t in types:
        if t not in schema.lesion_types:
            raise InputError(f"lesion type {t!r} of the conditioning table is not in the label schema",
                             field="labels.lesion_types")
        idx = schema.lesion_type_values[t]
        counts.append(maps2d[:, idx].double().sum(dim=tuple(range(1, maps2d.ndim))).numpy())
    counts = np.stack(counts, 1).astype(np.float64)
    norm = counts.max(0)
    norm[norm <= 0] = 1.0
    return (counts / norm).astype(np.float32), norm.tolist()


# --------------------------------------------------------------------------- VAE training


def class_weights(frequency, mode):
    """Per-class focal-loss weights from the training class frequencies (mean 1 over present
    classes); ``none``: unweighted. Absent classes get weight 0 (nothing to learn)."""
    if mode in (None, "none"):
        return None
    if mode != "inverse_sqrt_frequency":
        raise InputError(f"unknown class_weighting {mode!r}", field="label_generator.vae.class_weighting",
                         fix="use none or inverse_sqrt_frequency")
    f = frequency.double()
    w = torch.where(f > 0, 1.0 / f.clamp_min(1e-12).sqrt(), torch.zeros_like(f))
    return (w / w[f > 0].mean()).float()


def rare_class_voxels(data, rare):
    """subject index -> list of (V, D) voxel positions, one per rare class the subject has."""
    out = {}
    for i in range(data.shape[0]):
        per_class = [torch.nonzero(data[i, c].float() > 0.5) for c in rare]
        per_class = [pos for pos in per_class if len(pos)]
        if per_class:
            out[i] = per_class
    return out


def patch_origin(shape, patch, centres, fraction):
    """Corner of a random patch; with probability ``fraction`` (and when the subject has
    rare-class voxels) the patch is centred on a voxel of one of its rare classes, the class
    drawn first so the rarest count as much as the others (nnU-Net's foreground oversampling)."""
    if centres is not None and float(torch.rand(())) < fraction:
        voxels = centres[int(torch.randint(len(centres), (1,)))]
        c = voxels[int(torch.randint(len(voxels), (1,)))]
        return [int(min(max(int(ci) - p // 2, 0), s - p)) for ci, s, p in zip(c, shape, patch)]
    return [int(torch.randint(0, s - p + 1, (1,))) for s, p in zip(shape, patch)]


def init_posterior_sigma(vae, sigma):
    """Start the encoder's log-variance head at ``sigma`` (bias 2 log sigma, weights zero). With
    MONAI's initialisation the posterior sigma starts near 1 and the tiny KL weight lets it fall
    only slowly: after the demo's 1500 steps it was still 0.75 against latents of std 0.35-0.97,
    and the decoder had learnt to read only what survives that noise (thin CSF did not)."""
    if sigma is None:
        return
    sigma = float(sigma)
    if not 0.0 < sigma <= 1.0:
        raise InputError(f"vae.posterior_sigma_init must be in (0, 1], got {sigma}",
                         field="label_generator.vae.posterior_sigma_init", fix="use e.g. 0.1, or null")
    conv = vae.quant_conv_log_sigma.conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(2.0 * float(np.log(sigma)))


def reconstruction_loss(kind, gamma, weight):
    """Loss of the decoded logits against the probabilistic map: ``focal`` (the study's) or
    ``dice_ce`` (soft-target cross-entropy + soft Dice over the classes: sharper boundaries and
    thin structures such as CSF within a short training budget)."""
    from monai.losses import DiceCELoss, FocalLoss

    if kind == "focal":
        return FocalLoss(use_softmax=True, gamma=gamma, weight=weight)
    if kind == "dice_ce":
        return DiceCELoss(softmax=True, weight=weight, smooth_nr=1e-5, smooth_dr=1e-5)
    raise InputError(f"unknown reconstruction_loss {kind!r}", field="label_generator.vae.reconstruction_loss",
                     fix="use focal or dice_ce")


RECONSTRUCTION_TARGETS = ("soft", "argmax", "argmax_outside_lesions")


def reconstruction_target(x, kind, lesion_channels=()):
    """What the decoded logits are scored against: the probabilistic maps ``x`` themselves, the
    one-hot maps of their argmax (the classes the gate and the samples count), or the one-hot maps
    except in voxels where any of ``lesion_channels`` has probability, which keep their soft map:
    sharp tissue boundaries, while lesion edges stay soft (an argmax-trained decoder writes
    confident lesion specks from slightly-off latents). Every voxel keeps its argmax."""
    if kind == "soft":
        return x
    hard = torch.nn.functional.one_hot(x.argmax(1), x.shape[1]).movedim(-1, 1).to(x.dtype)
    if kind == "argmax":
        return hard
    near_lesion = x[:, list(lesion_channels)].sum(1, keepdim=True) > 0
    return torch.where(near_lesion, x, hard)


def vae_lesion_channels(kind, schema, n_classes):
    """The channels ``reconstruction_target`` keeps soft around (the schema's lesion classes) for
    ``argmax_outside_lesions``, else none; refused when the maps hold none of them (the target
    would silently be ``argmax``)."""
    if kind != "argmax_outside_lesions":
        return []
    channels = [schema.value(c) for c in schema.lesion_classes]
    if not channels or max(channels) >= n_classes:
        raise InputError(f"vae.reconstruction_target argmax_outside_lesions needs the label schema's lesion "
                         f"classes {list(schema.lesion_classes)} among the maps' {n_classes} channels",
                         field="label_generator.vae.reconstruction_target",
                         fix="declare lesion classes under labels, or use soft or argmax")
    return channels


def _vae_batch(data, bs, padded, patch, centres, oversample):
    """``bs`` training maps drawn at random, cropped to ``patch`` (centred on a rare-class voxel
    with probability ``oversample`` where the map has one) when patches are used."""
    idx = torch.randint(data.shape[0], (bs,))
    x = data[idx]
    if patch is None:
        return x
    crops = []
    for b in range(bs):
        pos = patch_origin(padded, patch, centres.get(int(idx[b])), oversample)
        crops.append(x[(b, slice(None)) + tuple(slice(o, o + p) for o, p in zip(pos, patch))])
    return torch.stack(crops)


def with_class_offsets(logits, offsets):
    """``logits`` ``(N, K, ...)`` plus one offset per class (``K`` values, in the logits' dtype)."""
    return logits + offsets.to(logits).view(1, -1, *([1] * (logits.ndim - 2)))


def decoded_logits(vae, z):
    """The decoder's logits of latents ``z``, plus the VAE's class offsets and divided by its
    temperature where it was loaded with a calibration (:func:`load_vae`): the offsets move
    argmaxes, the temperature only how soft the probabilities are. Both in float32, as they were
    fitted: under bfloat16 autocast a logit near 8 rounds to a multiple of 1/16, so offsets added
    there moved other argmaxes than the fit's."""
    logits = vae.decode_stage_2_outputs(z)
    offsets = getattr(vae, "class_offsets", None)
    if offsets is not None:
        logits = with_class_offsets(logits.float(), offsets)
    temperature = getattr(vae, "class_temperature", 1.0)
    return logits if temperature == 1.0 else logits.float() / temperature


def _dice_counts(pred, truth, n_classes):
    """Per class: voxels in both, voxels in either (counted twice where in both), as float64."""
    inter = torch.zeros(n_classes, dtype=torch.float64)
    total = torch.zeros(n_classes, dtype=torch.float64)
    for c in range(1, n_classes):
        a, b = truth == c, pred == c
        inter[c] = float((a & b).sum())
        total[c] = float(a.sum() + b.sum())
    return inter, total


def _mean_dice(inter, total):
    """Dice per non-background class present in either map, and their mean (1 when none is)."""
    dice = {c: 2.0 * float(inter[c]) / float(total[c]) for c in range(1, len(total)) if total[c] > 0}
    return (float(np.mean(list(dice.values()))) if dice else 1.0), dice


@torch.no_grad()
def reconstruction_score(vae, data, truth, device, amp=False, batch=4):
    """Dice after argmax per non-background class, pooled over the maps ``data`` (``(N, K, ...)``
    probabilistic, ``truth`` their argmax), of the VAE's decoded posterior means; and their mean
    over the classes present in either (the checkpoint selection's score). Pooling counts lesion
    voxels decoded in maps without that lesion as errors."""
    was_training = vae.training
    vae.eval()
    n_classes = data.shape[1]
    inter = torch.zeros(n_classes, dtype=torch.float64)
    total = torch.zeros(n_classes, dtype=torch.float64)
    for i in range(0, data.shape[0], batch):
        with C.autocast(device, amp):
            mu, _ = vae.encode(data[i:i + batch].to(device).float())
            pred = decoded_logits(vae, mu).float().argmax(1).cpu()
        both, either = _dice_counts(pred, truth[i:i + batch], n_classes)
        inter += both
        total += either
    vae.train(was_training)
    return _mean_dice(inter, total)


# offsets tried per class and round by fit_class_offsets (logit units)
OFFSET_STEPS = (-1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0)
CALIBRATION_MAPS = 32  # training maps decoded for the calibration (memory: 4 bytes x maps x classes x voxels)


def fit_class_offsets(logits, truth, classes, rounds=3):
    """Per-class offsets added to the decoder's logits ``(N, K, ...)`` that raise the pooled
    argmax Dice against ``truth`` ``(N, ...)`` (the selection's score), by coordinate ascent over
    ``classes`` (others stay 0) with the steps :data:`OFFSET_STEPS`. Why: a VAE spreads the
    probability of a thin class (the 4 mm grid's one-voxel CSF rim) over its neighbours, so the
    class loses the argmax where it should win it; a prior shift per class, fitted on the
    training maps, gives it back without retraining. -> offsets, score without them, score with
    them."""
    n_classes = logits.shape[1]
    offsets = torch.zeros(n_classes, dtype=torch.float32)
    logits = logits.float()

    def score(off):
        # argmax over the classes as a running maximum (first class on ties, as argmax): a tenth of
        # the time of argmax over the strided class axis
        top = logits[:, 0] + off[0]
        pred = torch.zeros(top.shape, dtype=torch.uint8)
        for c in range(1, n_classes):
            value = logits[:, c] + off[c]
            wins = value > top
            pred[wins] = c
            top = torch.where(wins, value, top)
        return _mean_dice(*_dice_counts(pred, truth, n_classes))[0]

    before = best = score(offsets)
    for _ in range(int(rounds)):
        improved = False
        for c in classes:
            for step in OFFSET_STEPS:
                trial = offsets.clone()
                trial[c] += step
                s = score(trial)
                if s > best + 1e-6:
                    best, offsets, improved = s, trial, True
        if not improved:
            break
    return offsets, before, best


TEMPERATURE_BOUNDS = (0.2, 5.0)  # the calibration's temperature search


def fit_temperature(logits, target, bounds=TEMPERATURE_BOUNDS, iterations=40):
    """The temperature ``T`` whose ``softmax(logits / T)`` is closest to the probabilistic maps
    ``target`` (mean soft-target cross-entropy, convex in ``1 / T``: golden-section search over
    ``1 / T`` within ``bounds`` of ``T``). Why: a decoder trained on argmax targets decides the
    classes well but draws near one-hot maps, while the image generator learnt from the real maps'
    partial volumes; ``T`` changes no argmax and gives the maps back their softness."""
    logits, target = logits.float(), target.float()

    def cross_entropy(beta):
        return float(-(target * torch.log_softmax(logits * beta, dim=1)).sum(1).mean())

    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    ratio = (5 ** 0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = cross_entropy(a), cross_entropy(b)
    for _ in range(int(iterations)):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = cross_entropy(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = cross_entropy(b)
    return 1.0 / ((lo + hi) / 2)


CALIBRATION_MODES = ("none", "tissue", "all")


def calibration_classes(mode, n_classes, schema):
    """The classes whose offsets ``label_generator.calibration`` fits: ``tissue``: background and
    tissue classes (lesions keep the size their conditioning asks for); ``all``: every class;
    ``none``: no class."""
    C.check_choice(mode, CALIBRATION_MODES, "label_generator.calibration")
    if mode == "none":
        return []
    lesions = set() if mode == "all" else {schema.value(c) for c in schema.lesion_classes if c in schema.classes}
    return [c for c in range(n_classes) if c not in lesions]


@torch.no_grad()
def calibrate_label_vae(vae_path, label_paths, mode, out_path, *, schema=None, device="auto", num_threads=None,
                        batch=4):
    """Fit the class offsets of a trained label VAE (:func:`fit_class_offsets`) and then its
    temperature (:func:`fit_temperature`, on the logits with those offsets, over the whole padded
    grid) on the decoded posterior means of (at most :data:`CALIBRATION_MAPS` of) its training
    maps and write them as JSON (``class_offsets``: null and no temperature for ``mode: none``),
    with the training-map score before and after. A stage of its own: the LDM trains on the
    encoder's latents and does not change with it; sampling and the audit decode with it."""
    C.set_threads(num_threads)
    schema = schema or LabelSchema()
    dev = C.get_device(device)
    vae, pay = load_vae(vae_path, dev)
    classes = calibration_classes(mode, int(pay["n_classes"]), schema)
    record = {"mode": mode, "class_offsets": None, "classes": [], "n_maps": 0}
    if classes:
        data, _, _ = _training_maps([str(p) for p in list(label_paths)[:CALIBRATION_MAPS]], int(pay["spatial_dims"]),
                                    n_classes=int(pay["n_classes"]))
        data = C.pad_background(data, pay["padded_shape"])
        amp = C.sampling_amp(dev, pay["config"].get("amp", False))
        logits = []
        for i in range(0, data.shape[0], batch):
            with C.autocast(dev, amp):
                mu, _ = vae.encode(data[i:i + batch].to(dev).float())
                logits.append(vae.decode_stage_2_outputs(mu).float().cpu())
        truth = data.argmax(1).to(torch.uint8)
        logits = torch.cat(logits)
        offsets, before, after = fit_class_offsets(logits, truth, classes)
        offsets = [round(float(o), 6) for o in offsets]
        stored = torch.tensor(offsets, dtype=torch.float32)  # the offsets as sampling loads them
        temperature = round(fit_temperature(with_class_offsets(logits, stored), data), 4)
        if not TEMPERATURE_BOUNDS[0] * 1.05 <= temperature <= TEMPERATURE_BOUNDS[1] * 0.98:
            log.warning("label VAE calibration: the temperature %.3f is at the edge of its search %s",
                        temperature, TEMPERATURE_BOUNDS)
        names = {v: k for k, v in schema.classes.items()}
        record.update(class_offsets=offsets, temperature=temperature,
                      classes=[names.get(c, c) for c in classes],
                      n_maps=int(data.shape[0]), score_before=before, score_after=after)
        log.info("label VAE calibration (%s) on %d training maps: offsets %s, temperature %.3f, training-map "
                 "reconstruction %.4f -> %.4f", mode, data.shape[0], [round(float(o), 2) for o in offsets],
                 temperature, before, after)
    else:
        log.info("label VAE calibration off (label_generator.calibration: none): the decoder's logits as trained")
    save_json(record, out_path)
    return record


def calibration_record(path):
    """A calibration JSON's content (``{}`` for none), or a clear error where it cannot be read."""
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the label VAE calibration ({exc})", file=path,
                         fix="rerun the rule calibrate_label_vae") from exc


def load_calibration(path, n_classes):
    """The class offsets (None: no file, or calibration off) and temperature (1.0 where the file
    has none) of a calibration JSON."""
    if path is None:
        return None, 1.0
    record = calibration_record(path)
    offsets = record.get("class_offsets")
    if offsets is None:
        return None, 1.0
    if len(offsets) != int(n_classes):
        raise InputError(f"the calibration has {len(offsets)} class offsets for a VAE of {n_classes} classes",
                         file=path, fix="rerun the rule calibrate_label_vae for this VAE")
    temperature = float(record.get("temperature", 1.0))
    if not temperature > 0:
        raise InputError(f"the calibration's temperature must be > 0, got {temperature}", file=path,
                         fix="rerun the rule calibrate_label_vae for this VAE")
    return torch.tensor(offsets, dtype=torch.float32), temperature


def _vae_generator_losses(v, logits, z_mu, z_sigma, x, recon, disc, adv_loss, perc, lesion_channels=()):
    """The autoencoder's loss terms (``loss``: their weighted sum) and the decoded probabilities:
    reconstruction + KL, the adversarial term when ``disc`` is given (after the warm-up), the
    perceptual term when ``perc`` is. (The order of the terms fixes autograd's summation order,
    so a run's weights stay bit for bit what they were.)"""
    zero = torch.zeros((), device=logits.device)
    target = reconstruction_target(x, v["reconstruction_target"], lesion_channels)
    out = {"reconstruction": recon(logits.float(), target), "kl": kl_loss(z_mu.float(), z_sigma.float())}
    loss = out["reconstruction"] + float(v["kl_weight"]) * out["kl"]
    prob = torch.softmax(logits.float(), dim=1)
    out["gen_adv"] = zero
    if disc is not None:
        out["gen_adv"] = adv_loss(disc(prob.contiguous())[-1], target_is_real=True, for_discriminator=False)
        loss = loss + float(v["adv_weight"]) * out["gen_adv"]
    out["perceptual"] = zero
    if perc is not None:
        out["perceptual"] = _channelwise_perceptual(perc, prob, x)
        loss = loss + float(v["perceptual_weight"]) * out["perceptual"]
    return {"loss": loss, **out}, prob


def _vae_example(vae, disc, data, bs, patch, device):
    """The shapes a VAE training runs: a batch of patches through the VAE and the discriminator,
    one whole map through the VAE (the selection score)."""
    x = data[:bs]
    if patch is not None:
        x = x[(slice(None), slice(None)) + tuple(slice(0, p) for p in patch)]
    x = x.to(device).float()
    logits = vae(x)[0]
    disc(torch.softmax(logits, 1).contiguous())
    vae(data[:1].to(device).float())


def train_label_vae(label_paths, cfg, out_dir, *, schema=None, max_steps_this_run=None, callback=None):
    """Train the label autoencoder. Returns a dict of output paths (``model``, ``config``,
    ``losses_tsv``, ``losses_png``) or, when stopped by ``max_steps_this_run``, ``{"completed": False}``.
    ``schema`` (default :class:`LabelSchema`) names the lesion channels of
    ``vae.reconstruction_target: argmax_outside_lesions``.
    """
    cfg = resolve_config(cfg)
    out_dir = Path(out_dir)
    C.set_threads(cfg["num_threads"])
    device = C.get_device(cfg["device"])
    sd = int(cfg["spatial_dims"])
    v = cfg["vae"]
    C.seed_everything(cfg["seed"])

    factor = _levels_factor(len(v["channels"]))
    patch = None
    if v["patch_size"]:
        patch = [int(p) for p in v["patch_size"]]
        if len(patch) != sd or any(p % factor for p in patch):
            raise InputError(f"vae.patch_size {patch} must have {sd} sizes divisible by {factor}",
                             field="label_generator.vae.patch_size",
                             fix=f"give {sd} sizes that are multiples of {factor}, or null for whole maps")
    data, shape, _ = _training_maps([str(p) for p in label_paths], sd)
    n_classes = data.shape[1]
    padded = C.divisible_shape(shape, factor)
    data = C.pad_background(data, padded)
    if patch is not None:
        patch = [min(p, s) for p, s in zip(patch, padded)]
    log.info("label VAE: %d %s maps, %d classes, grid %s (padded %s), patch %s, device %s",
             data.shape[0], f"{sd}-D", n_classes, shape, padded, patch, device)

    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator

    vkw = _vae_kwargs(cfg, n_classes)
    vae = build_vae(vkw)
    init_posterior_sigma(vae, v["posterior_sigma_init"])
    vae = vae.to(device)
    use_adv = float(v["adv_weight"]) > 0
    disc = PatchDiscriminator(spatial_dims=sd, channels=int(v["disc_channels"]), in_channels=n_classes,
                              num_layers_d=int(v["disc_layers"]), out_channels=1).to(device)
    bs = int(v["batch_size"])
    amp = C.training_amp(device, cfg["amp"], torch.nn.ModuleList([vae, disc]),
                         lambda: _vae_example(vae, disc, data, bs, patch, device), "label VAE")
    layout = C.training_layout(torch.nn.ModuleList([vae, disc]), device, amp)
    frequency = data.float().mean(dim=tuple(d for d in range(data.ndim) if d != 1))
    weight = class_weights(frequency, v["class_weighting"])
    rare = C.rare_classes(frequency)
    centres = rare_class_voxels(data, rare) if patch is not None and float(v["rare_class_oversample"]) > 0 else {}
    log.info("class frequencies %s; focal weights %s; rare classes %s (patches centred on them: %.0f%%)",
             np.round(frequency.numpy(), 5).tolist(), None if weight is None else np.round(weight.numpy(), 2).tolist(),
             rare, 100 * float(v["rare_class_oversample"]) if centres else 0)
    recon = reconstruction_loss(v["reconstruction_loss"], float(v["focal_gamma"]), weight)
    C.check_choice(v["reconstruction_target"], RECONSTRUCTION_TARGETS, "label_generator.vae.reconstruction_target")
    lesion_channels = vae_lesion_channels(v["reconstruction_target"], schema or LabelSchema(), n_classes)
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    perc = C.build_perceptual(sd, v["perceptual_weight"], v["perceptual_weights_path"], "label_generator.vae")
    if perc is not None:
        perc = perc.to(device)
    opt_g = torch.optim.Adam(vae.parameters(), lr=float(v["lr"]))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(v["disc_lr"]))
    sc_g, sc_d = C.make_scaler(device, amp), C.make_scaler(device, amp)
    warmup = int(v["adv_warmup_steps"])
    total = int(v["steps"])
    schedule = v["lr_schedule"]
    C.check_choice(schedule, C.LR_SCHEDULES, "label_generator.vae.lr_schedule")
    select_every = int(v["select_every"])
    if select_every < 0:
        raise InputError(f"vae.select_every must be >= 0, got {select_every}", field="label_generator.vae.select_every",
                         fix="give a number of steps, or 0 to keep the last weights")
    best = C.BestWeights(vae) if select_every else None
    truth = data.argmax(1).to(torch.uint8) if select_every else None  # class values < 256: an eighth of int64

    def step_fn(step):
        vae.train()
        C.set_lr(opt_g, C.scheduled_lr(v["lr"], step, total, schedule))
        C.set_lr(opt_d, C.scheduled_lr(v["disc_lr"], step, total, schedule))
        x = _vae_batch(data, bs, padded, patch, centres, float(v["rare_class_oversample"])).to(device).float()
        adversarial = use_adv and step > warmup
        with C.autocast(device, amp):
            logits, z_mu, z_sigma = vae(x)
            losses, prob = _vae_generator_losses(v, logits, z_mu, z_sigma, x, recon, disc if adversarial else None,
                                                 adv_loss, perc, lesion_channels)
        C.optimizer_step(losses["loss"], opt_g, sc_g)
        losses["disc"] = torch.zeros((), device=device)
        if adversarial:
            with C.autocast(device, amp):
                fake = adv_loss(disc(prob.detach().contiguous())[-1], target_is_real=False, for_discriminator=True)
                real = adv_loss(disc(x.contiguous())[-1], target_is_real=True, for_discriminator=True)
                losses["disc"] = 0.5 * (fake + real)
            C.optimizer_step(float(v["adv_weight"]) * losses["disc"], opt_d, sc_d)
        if best is not None and (step % select_every == 0 or step == total):
            score, dice = reconstruction_score(vae, data, truth, device, amp)
            kept = best.offer(step, score, vae)
            log.info("label VAE step %d: training-map reconstruction %.4f (per class %s)%s", step, score,
                     {c: round(d, 3) for c, d in dice.items()}, " - best so far, kept" if kept else "")
        return {k: losses[k].item() for k in ("loss", "reconstruction", "kl", "gen_adv", "disc", "perceptual")}

    fp = C.config_hash(_fingerprint_cfg(cfg, "vae"), C.files_fingerprint(label_paths), "label_vae",
                       bool(amp), layout, *([lesion_channels] if lesion_channels else []))
    modules = {"vae": vae, "disc": disc}
    if best is not None:
        modules["best"] = best
    history, completed, _ = C.train_loop(
        name="label_vae", total_steps=total, step_fn=step_fn,
        modules=modules, optimizers={"g": opt_g, "d": opt_d},
        scalers={"g": sc_g, "d": sc_d}, out_dir=out_dir, fingerprint=fp,
        checkpoint_every=cfg["checkpoint_every"], log_every=cfg["log_every"],
        max_steps_this_run=max_steps_this_run, callback=callback, device=device)
    if not completed:
        return {"completed": False, "history": history}

    selected = {}
    if best is not None:
        selected = {"selected_step": int(best.step), "selection_score": float(best.score)}
        log.info("label VAE: keeping the weights of step %d (training-map reconstruction %.4f)",
                 selected["selected_step"], selected["selection_score"])
    kept = vae if best is None else best.model
    payload = {"kind": "label_vae", "vae_kwargs": vkw, "state_dict": C.state_dict_cpu(kept),
               "spatial_dims": sd, "n_classes": n_classes, "shape": list(shape), "padded_shape": list(padded),
               "config": cfg, "steps": total, "patch_size": patch, "training_amp": bool(amp), **selected}
    record = {"label_generator": cfg, "vae_kwargs": vkw, "shape": list(shape), "padded_shape": list(padded),
              "n_training": len(label_paths), "training_amp": bool(amp), **selected}
    return C.finish_training("label_vae", out_dir, payload, record, history, "label VAE")


# --------------------------------------------------------------------------- LDM training


def latent_lesion_mask(data, schema, latent_shape, classes=None):
    """``(N, 1, *latent)`` 1 where the latent voxel covers a lesion voxel of the map (max
    pooling of the lesion probability > 0.5): where the LDM loss weighs more, so that lesions,
    1-3% of a brain, are not lost under the anatomy in a short training. ``classes``: only
    these lesion classes (default: all)."""
    classes = schema.lesion_classes if classes is None else classes
    idx = [schema.value(c) for c in classes if c in schema.classes]
    les = (data[:, idx].float().sum(1, keepdim=True) > 0.5).float()
    pooled = F.adaptive_max_pool3d(les, latent_shape) if les.ndim == 5 else F.adaptive_max_pool2d(les, latent_shape)
    return pooled


def latent_loss_weights(data, schema, latent_shape, lesion_weight):
    """``(N, 1, *latent)`` L2 weights of the LDM loss, or None for plain L2. A number weighs
    every lesion alike (``1 + w`` over any lesion); a mapping ``{type: w}`` weighs each lesion
    type on its own (the larger where types meet), because one weight that makes small WMH
    learnable also makes the model overdraw large tumours."""
    if not isinstance(lesion_weight, dict):
        w = float(lesion_weight)
        return None if w == 0 else 1.0 + w * latent_lesion_mask(data, schema, latent_shape)
    extra = None
    for lesion_type, w in lesion_weight.items():
        if float(w) == 0:
            continue
        term = float(w) * latent_lesion_mask(data, schema, latent_shape, schema.lesion_types[lesion_type])
        extra = term if extra is None else torch.maximum(extra, term)
    return None if extra is None else 1.0 + extra


def with_condition_channels(x, ctx, on):
    """``x`` with the context vector appended as constant channels (``on``), else ``x``: a
    second, direct path for the conditioning besides cross-attention."""
    if not on:
        return x
    c = ctx[:, 0].to(x.dtype).view(ctx.shape[0], -1, *([1] * (x.ndim - 2)))
    return torch.cat([x, c.expand(-1, -1, *x.shape[2:])], dim=1)


def condition_context(cond, keep=None, presence=False):
    """``(B, n_types)`` dc -> ``(B, 1, context_dim)`` context: dc, with ``presence`` a 0/1 flag
    per lesion type (dc > 0), and a "conditioned" flag, all zero where ``keep`` is 0 (the null
    context of classifier-free guidance)."""
    cond = torch.as_tensor(np.array(cond, dtype=np.float32)) if not torch.is_tensor(cond) else cond.float()
    keep = torch.ones(cond.shape[0]) if keep is None else torch.as_tensor(keep, dtype=torch.float32)
    parts = [cond, (cond > 0).float()] if presence else [cond]
    ctx = torch.cat(parts + [torch.ones(cond.shape[0], 1)], dim=1) * keep[:, None]
    return ctx.unsqueeze(1)


@torch.no_grad()
def _encode_all(vae, data, device, batch=4):
    mus, sigmas = [], []
    for i in range(0, data.shape[0], batch):
        mu, sigma = vae.encode(data[i:i + batch].to(device).float())
        mus.append(mu.float().cpu())
        sigmas.append(sigma.float().cpu())
    return torch.cat(mus), torch.cat(sigmas)


LATENT_NORMS = ("global", "channel", "residual")


def _check_ldm_settings(m, schema):
    """Refuse LDM settings outside their ranges before any work, naming the key."""
    p_drop = float(m["condition_dropout"])
    if not 0.0 <= p_drop < 1.0:
        raise InputError(f"ldm.condition_dropout must be in [0, 1), got {p_drop}",
                         field="label_generator.ldm.condition_dropout", fix="use e.g. 0.15, or 0 to disable")
    ema_decay = float(m["ema_decay"])
    if not 0.0 <= ema_decay < 1.0:
        raise InputError(f"ldm.ema_decay must be in [0, 1), got {ema_decay}",
                         field="label_generator.ldm.ema_decay",
                         fix="use e.g. 0.999, or 0 to sample from the last weights")
    if m["latents"] not in ("mean", "sample"):
        raise InputError(f"ldm.latents must be mean or sample, got {m['latents']!r}",
                         field="label_generator.ldm.latents")
    if m["latent_norm"] not in LATENT_NORMS:
        raise InputError(f"ldm.latent_norm must be one of {', '.join(LATENT_NORMS)}, got {m['latent_norm']!r}",
                         field="label_generator.ldm.latent_norm")
    settings.loss_weights(m["lesion_weight"], list(schema.lesion_types))
    patch = m["patch_size"]
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise InputError(f"ldm.patch_size must be an integer >= 1, got {patch!r}",
                         field="label_generator.ldm.patch_size",
                         fix="use 1 (the U-Net on the latent grid) or 2 (on 2x2x2 blocks of latent voxels)")


def _latent_normalisation(mu, sigma, m, seed):
    """``(z_sample, scale_factor, shift, scale)``: the latents the LDM learns (posterior means, or
    one seeded draw from the posterior), the shift that centres them and the per-channel scale that
    standardises them (``global``: MONAI tutorials' one scale factor, no shift; ``channel``:
    per-channel mean / std; ``residual``: the mean latent over the maps, per voxel, ``(C, *spatial)``,
    and the per-channel std of what is left)."""
    g = C.generator(seed + 1)
    z_sample = mu if m["latents"] == "mean" else mu + sigma * torch.randn(mu.shape, generator=g)
    scale_factor = float(1.0 / z_sample.flatten().std().clamp_min(1e-6))
    nc = mu.shape[1]
    if m["latent_norm"] == "global":
        shift = torch.zeros(nc)
        scale = torch.full((nc,), scale_factor)
    elif m["latent_norm"] == "residual":
        shift = z_sample.mean(0)
        scale = 1.0 / (z_sample - shift).transpose(0, 1).reshape(nc, -1).std(1).clamp_min(1e-6)
    else:
        zc = z_sample.transpose(0, 1).reshape(nc, -1)
        shift = zc.mean(1)
        scale = 1.0 / zc.std(1).clamp_min(1e-6)
    return z_sample, scale_factor, shift, scale


def latent_shift_tensor(shift, n_channels, spatial_dims):
    """The stored latent shift shaped to broadcast over a batch of latents: per channel
    ``(1, C, 1, ...)`` or, for ``latent_norm: residual``, the mean latent ``(1, C, *spatial)``."""
    t = torch.as_tensor(shift, dtype=torch.float32)
    return t.view((1, n_channels) + (1,) * spatial_dims) if t.ndim == 1 else t[None]


def train_label_ldm(vae_path, label_paths, cond_table, cfg, out_dir, *, subjects=None, schema=None,
                    max_steps_this_run=None, callback=None):
    """Train the conditioned latent diffusion model on the frozen VAE's latents.

    ``subjects`` (optional) gives the conditioning-table subject of each label map;
    by default it is matched from the file names. Returns a dict of output paths.
    """
    cfg = resolve_config(cfg)
    out_dir = Path(out_dir)
    C.set_threads(cfg["num_threads"])
    device = C.get_device(cfg["device"])
    m = cfg["ldm"]
    schema = schema or LabelSchema()
    C.seed_everything(cfg["seed"])

    _check_ldm_settings(m, schema)
    p_drop, ema_decay = float(m["condition_dropout"]), float(m["ema_decay"])
    presence = bool(m["lesion_presence"])

    vae, vpay = load_vae(vae_path, device)
    for p in vae.parameters():
        p.requires_grad_(False)
    sd = int(vpay["spatial_dims"])
    if sd != int(cfg["spatial_dims"]):
        log.info("label LDM: spatial_dims taken from the VAE (%d)", sd)
        cfg["spatial_dims"] = sd
    if sd == 2 and m["latent_norm"] == "residual":
        raise InputError("ldm.latent_norm residual needs 3D label maps: slices of different levels share no "
                         "mean latent", field="label_generator.ldm.latent_norm", fix="use channel for 2D generators")
    label_paths = [str(p) for p in label_paths]
    data, shape, _ = _training_maps(label_paths, sd, vpay["n_classes"])
    if list(shape) != list(vpay["shape"]):
        raise InputError(f"label maps have grid {shape} but the VAE was trained on {vpay['shape']}",
                         fix="retrain the VAE on the current working grid")
    data = C.pad_background(data, vpay["padded_shape"])

    df, types = load_conditioning_table(cond_table)
    norm = None
    if sd == 3:
        cond, subjects = _subject_conditioning(label_paths, df, types, subjects)
    else:
        cond, norm = _slice_conditioning(data, types, schema)
    cond_t = torch.from_numpy(np.asarray(cond, dtype=np.float32))

    mu, sigma = _encode_all(vae, data, device)
    weights = latent_loss_weights(data, schema, mu.shape[2:], m["lesion_weight"])
    if weights is not None:
        log.info("label LDM: loss weight 1 + %s on latent voxels over lesions (%.2f%% of the latent voxels)",
                 m["lesion_weight"], 100 * float((weights > 1).float().mean()))
    use_mean = m["latents"] == "mean"
    z_sample, scale_factor, shift, scale = _latent_normalisation(mu, sigma, m, int(cfg["seed"]))
    nc = mu.shape[1]
    bshape = (1, nc) + (1,) * (mu.ndim - 2)
    shift_b, scale_b = latent_shift_tensor(shift, nc, mu.ndim - 2), scale.view(bshape)
    log.info("label LDM: VAE posterior sigma mean %.3g vs latent mean std %.3g; training on %s latents",
             float(sigma.mean()), float(mu.std()), m["latents"])
    latent_shape = list(mu.shape[2:])
    zn = (z_sample - shift_b) * scale_b
    latent_range = [float(zn.min()), float(zn.max())]
    lpad = list(C.divisible_shape(latent_shape, _levels_factor(len(m["channels"])) * int(m["patch_size"])))
    log.info("label LDM: %d latents %s (padded %s), scale factor %.4f, lesion types %s, device %s",
             mu.shape[0], latent_shape, lpad, scale_factor, types, device)

    ukw = _unet_kwargs(cfg, mu.shape[1], len(types))
    concat = bool(m["condition_channels"])
    unet = build_unet(ukw).to(device)
    bs = int(m["batch_size"])

    def example():
        z = C.pad_to(((mu[:bs] - shift_b) * scale_b), lpad).to(device)
        ctx = condition_context(cond_t[:bs], presence=presence).to(device)
        t = torch.linspace(0, int(m["num_train_timesteps"]) - 1, z.shape[0]).long().to(device)
        unet(x=with_condition_channels(z, ctx, concat), timesteps=t, context=ctx)

    amp = C.training_amp(device, cfg["amp"], unet, example, "label LDM")
    layout = C.training_layout(unet, device, amp)
    ema = C.ema_copy(unet) if ema_decay > 0 else None
    skw = _scheduler_kwargs(cfg)
    sched = build_scheduler("ddpm", skw)
    opt = torch.optim.Adam(unet.parameters(), lr=float(m["lr"]))
    scaler = C.make_scaler(device, amp)
    T = int(m["num_train_timesteps"])

    def target(z, noise, t):
        return C.diffusion_target(sched, skw["prediction_type"], z, noise, t)

    def step_fn(step):
        unet.train()
        idx = torch.randint(mu.shape[0], (bs,))
        z = mu[idx] if use_mean else mu[idx] + sigma[idx] * torch.randn(sigma[idx].shape)
        z = (z - shift_b) * scale_b
        z = C.pad_to(z, lpad).to(device)
        keep = (torch.rand(bs) >= p_drop).float() if p_drop > 0 else torch.ones(bs)
        ctx = condition_context(cond_t[idx], keep, presence).to(device)
        noise = torch.randn(z.shape).to(device)
        t = torch.randint(0, T, (bs,)).long().to(device)
        with C.autocast(device, amp):
            noisy = sched.add_noise(original_samples=z, noise=noise, timesteps=t)
            pred = unet(x=with_condition_channels(noisy, ctx, concat), timesteps=t, context=ctx)
            se = (pred.float() - target(z, noise, t).float()) ** 2
            loss = se.mean() if weights is None else (se * C.pad_to(weights[idx], lpad).to(device)).mean()
        C.optimizer_step(loss, opt, scaler)
        if ema is not None:
            C.ema_update(ema, unet, ema_decay, step)
        return {"mse": loss.item()}

    fp = C.config_hash(_fingerprint_cfg(cfg, "ldm"), C.files_fingerprint(label_paths + [vae_path]),
                       np.asarray(cond).round(6).tolist(), "label_ldm", bool(amp), layout)
    history, completed, _ = C.train_loop(
        name="label_ldm", total_steps=int(m["steps"]), step_fn=step_fn,
        modules={"unet": unet} if ema is None else {"unet": unet, "ema": ema},
        optimizers={"opt": opt}, scalers={"scaler": scaler}, out_dir=out_dir, fingerprint=fp,
        checkpoint_every=cfg["checkpoint_every"], log_every=cfg["log_every"],
        max_steps_this_run=max_steps_this_run, callback=callback, device=device)
    if not completed:
        return {"completed": False, "history": history}

    sampled = unet if ema is None else ema
    payload = {"kind": "label_ldm", "unet_kwargs": ukw, "state_dict": C.state_dict_cpu(sampled),
               "scheduler_kwargs": skw, "scale_factor": scale_factor, "latent_shape": latent_shape,
               "latent_shift": shift.tolist(), "latent_scale": scale.tolist(),
               "padded_latent_shape": lpad, "lesion_types": types, "spatial_dims": sd,
               "latent_range": latent_range,
               "train_conditioning": np.asarray(cond, dtype=np.float32), "slice_count_norm": norm,
               "sampling": cfg["sampling"], "config": cfg, "subjects": subjects, "training_amp": bool(amp)}
    record = {"label_generator": cfg, "unet_kwargs": ukw, "scheduler_kwargs": skw, "scale_factor": scale_factor,
              "latent_shape": latent_shape, "padded_latent_shape": lpad, "lesion_types": types,
              "slice_count_norm": norm, "n_training": len(label_paths), "training_amp": bool(amp)}
    return C.finish_training("label_ldm", out_dir, payload, record, history, "label LDM")


# --------------------------------------------------------------------------- sampling


def training_conditioning(ldm_path):
    """``(lesion_types, (N, n_types) array)`` of the conditioning seen in training."""
    payload = C.torch_load(ldm_path)
    return list(payload["lesion_types"]), np.asarray(payload["train_conditioning"], dtype=np.float32)


def training_subjects(ldm_path):
    """The subjects whose label maps trained the LDM (its conditioning-table names)."""
    return list(C.torch_load(ldm_path)["subjects"])


def make_conditioning(mode, n, lesion_types, train_values=None, values=None, seed=0):
    """Build an ``(n, n_types)`` float32 conditioning array in [0, 1].

    mode ``explicit``: ``values`` is a dict type -> value, a sequence of ``n_types``
    values or an ``(n, n_types)`` array. ``random``: rows of ``train_values`` drawn
    with replacement. ``unseen``: every type > 0 at once, each drawn from the
    non-zero training values of that type (uniform [0.1, 0.5] when a type never
    occurs). ``<type>_only`` (e.g. ``tumour_only``): that type alone, drawn the same
    way, the others 0 (a set of cases of one disease). ``healthy``: zeros.
    """
    types = list(lesion_types)
    k = len(types)
    check_conditioning_mode(mode, types)
    rng = np.random.default_rng([int(seed), 7])
    tv = np.zeros((0, k), np.float32) if train_values is None else np.asarray(train_values, np.float32)

    def nonzero_draws(j):
        pos = tv[:, j][tv[:, j] > 0] if len(tv) else np.zeros(0)
        return rng.choice(pos, size=n) if len(pos) else rng.uniform(0.1, 0.5, size=n)

    if mode == "explicit":
        if values is None:
            raise InputError("explicit conditioning needs values", field="conditioning.values",
                             fix="give e.g. {wmh: 0.3, tumour: 0.0}")
        if isinstance(values, dict):
            unknown = set(values) - set(types)
            if unknown:
                raise InputError(f"unknown lesion types {sorted(unknown)}", field="conditioning.values",
                                 fix=f"use {types}")
            row = np.array([float(values.get(t, 0.0)) for t in types], dtype=np.float32)
            out = np.tile(row, (n, 1))
        else:
            arr = np.asarray(values, dtype=np.float32)
            if arr.ndim == 1 and arr.shape[0] == k:
                out = np.tile(arr, (n, 1))
            elif arr.shape == (n, k):
                out = arr.copy()
            else:
                raise InputError(f"conditioning values of shape {arr.shape} do not fit n={n}, types={types}",
                                 field="conditioning.values")
    elif mode == "random":
        if train_values is None or len(train_values) == 0:
            raise InputError("random conditioning needs the training conditioning values")
        tv = np.asarray(train_values, dtype=np.float32)
        out = tv[rng.integers(0, len(tv), size=n)]
    elif mode == "unseen":
        out = np.zeros((n, k), np.float32)
        for j in range(k):
            out[:, j] = nonzero_draws(j)
    elif mode == "healthy":
        out = np.zeros((n, k), np.float32)
    else:
        out = np.zeros((n, k), np.float32)
        j = types.index(single_type_of(mode))
        out[:, j] = nonzero_draws(j)
    if out.min() < 0 or out.max() > 1:
        raise InputError("conditioning values must lie in [0, 1]", field="conditioning.values")
    return np.ascontiguousarray(out, dtype=np.float32)


def composed_contexts(cond, typical=None, presence=False):
    """Contexts of a composed request: ``[null, healthy, type 1 alone, ..., type k alone]``, each
    ``(B, 1, context_dim)``; type j alone keeps row i's value of type j and zeroes the others.
    With ``typical`` (one dc per type), a row that does not ask for type j gets type j alone at
    its typical value instead: the context its prediction is steered away from."""
    cond = np.asarray(cond, dtype=np.float32)
    singles = []
    for j in range(cond.shape[1]):
        one = np.zeros_like(cond)
        one[:, j] = cond[:, j]
        if typical is not None:
            one[cond[:, j] <= 0, j] = typical[j]
        singles.append(condition_context(one, presence=presence))
    return [condition_context(cond, np.zeros(len(cond)), presence),
            condition_context(np.zeros_like(cond), presence=presence)] + singles


def typical_lesion_values(train_conditioning):
    """Median dc of the training maps holding each lesion type (0.5 for a type none holds)."""
    tv = np.asarray(train_conditioning, dtype=np.float32)
    return np.array([float(np.median(tv[tv[:, j] > 0, j])) if (tv[:, j] > 0).any() else 0.5
                     for j in range(tv.shape[1])], dtype=np.float32)


def compose_weights(weight, lesion_types):
    """Per lesion type multipliers of ``sampling.compose_weight`` in ``lesion_types`` order
    (:func:`settings.compose_weights`: refused before any sampling when a key is not a lesion type
    of the model or a value is not a number > 0)."""
    return np.array(list(settings.compose_weights(weight, lesion_types).values()), dtype=np.float32)


def resolve_compose_weight(sampling, fitted=None):
    """``sampling`` (a ``label_generator.sampling`` dict) with ``compose_weight: fit`` replaced by the
    weights of ``fitted`` (the JSON of rule fit_compose_weight); other values are kept as given."""
    sampling = dict(sampling or {})
    if sampling.get("compose_weight") != settings.FIT:
        return sampling
    if fitted is None:
        raise InputError("sampling.compose_weight is fit, and no fitted weights were given",
                         field="label_generator.sampling.compose_weight", fix="rerun the rule fit_compose_weight")
    try:
        weights = json.loads(Path(fitted).read_text())["compose_weight"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the fitted compose weights ({exc})", file=fitted,
                         fix="rerun the rule fit_compose_weight") from exc
    if not isinstance(weights, dict):
        raise InputError("the fitted compose weights are not a mapping of lesion types", file=fitted,
                         fix="rerun the rule fit_compose_weight")
    return {**sampling, "compose_weight": weights}


def _composed_prediction(unet, x, tt, contexts, cond, guidance, concat, dev, negate=False, weights=None):
    """Guided prediction of a batch in which some rows ask for several lesion types at once.

    Composable diffusion (Liu et al. 2022), relative to the healthy context: null + w (healthy -
    null) + w sum_j (type j alone - healthy) for the requested types j, so each lesion type adds the
    change it learnt alone. A training set without any map holding two lesion types teaches
    the joint context nothing; each type alone it has seen. Rows asking for one type or none get
    the plain guided prediction null + w (context - null), the same thing.

    ``negate`` (contexts from ``composed_contexts(cond, typical)``): each type a row does not ask
    for is subtracted, - (type j typical - healthy), so a healthy or single-type request is
    pushed away from the lesions the model would otherwise add unasked.

    ``weights`` (:func:`compose_weights`, one per type; default all 1) scale each type's term:
    where two types compete for the same voxels, the one whose change the model draws weaker
    can be given more weight."""
    n = len(contexts)
    allc = torch.cat(contexts).to(dev)
    preds = unet(x=with_condition_channels(torch.cat([x] * n), allc, concat), timesteps=torch.cat([tt] * n),
                 context=allc).float().chunk(n)
    null, healthy, singles = preds[0], preds[1], preds[2:]
    bshape = (-1,) + (1,) * (x.ndim - 1)
    out = healthy
    for j, single in enumerate(singles):
        on = torch.as_tensor(cond[:, j] > 0, dtype=single.dtype, device=dev).view(bshape)
        sign = 2 * on - 1 if negate else on
        k = 1.0 if weights is None else float(weights[j])
        out = out + k * sign * (single - healthy)
    return null + guidance * (out - null)


#: ``sampling.unrequested_lesions``: what happens to decoded classes of lesion types a request
#: does not ask for
UNREQUESTED_LESIONS = ("keep", "remove")


def _check_unrequested_lesions(setting):
    if setting not in UNREQUESTED_LESIONS:
        raise InputError(f"unrequested_lesions must be one of {list(UNREQUESTED_LESIONS)}, got {setting!r}",
                         field="label_generator.sampling.unrequested_lesions",
                         fix="use remove (samples hold only the lesion types they ask for) or keep")


def sampling_config(ldm_payload, sampling=None):
    """The sampling settings in force: DEFAULTS, then those stored with the LDM (``ldm_payload``, its
    model file's content or path), then ``sampling`` (a ``label_generator.sampling`` dict)."""
    if not isinstance(ldm_payload, dict):
        ldm_payload = C.torch_load(ldm_payload)
    samp = C.merge_config(DEFAULTS["sampling"], ldm_payload.get("sampling"), where="label_generator.sampling")
    samp = C.merge_config(samp, sampling, where="label_generator.sampling")  # overrides of the stored config
    _check_unrequested_lesions(samp["unrequested_lesions"])
    return samp


def _unrequested_classes(conditioning, lesion_types, schema):
    """Per request row, the label values of every lesion type whose dc is 0 in it."""
    unknown = [t for t in lesion_types if t not in schema.lesion_types]
    if unknown:
        raise InputError(f"the LDM's lesion types {unknown} are not in the label schema "
                         f"(its types: {list(schema.lesion_types)})", field="labels.lesion_types",
                         fix="sample with the label schema the generator was trained with")
    values = schema.lesion_type_values
    cond = np.asarray(conditioning, dtype=np.float32)
    return [[v for j, t in enumerate(lesion_types) if row[j] == 0 for v in values[t]] for row in cond]


def resolve_unrequested_lesions(probs, conditioning, lesion_types, schema, setting):
    """``(maps, leaked)``: the maps ``(N, K, *spatial)`` with, where ``setting`` is ``remove``, the
    classes of every lesion type whose dc is 0 in a map's request given probability 0 and the rest
    renormalised (the argmax then picks the most probable remaining class); ``leaked``: per map, the
    voxels whose decoded argmax was such a class, counted under either setting.

    Why: the decoder draws a few voxels of a lesion type nobody asked for next to a requested
    lesion (oedema specks beside WMH), and a segmenter trained on the sample learns them as that
    type; brainSPADE's own sampler decides the type of its generated lesion by the request, not
    by the decoder, and so does this."""
    _check_unrequested_lesions(setting)
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float32)
    hard = probs.argmax(1)
    leaked = np.zeros(len(probs), dtype=np.int64)
    out = probs.copy() if setting == "remove" else probs
    for i, classes in enumerate(_unrequested_classes(conditioning, lesion_types, schema)):
        if not classes:
            continue
        leaked[i] = int(np.isin(hard[i], classes).sum())
        if setting == "remove":
            out[i, classes] = 0
            out[i, 0][out[i].sum(0) == 0] = 1  # all its probability was on removed classes: background
            out[i] /= out[i].sum(0, keepdims=True)
    return out, leaked


def remove_unrequested_logits(logits, conditioning, lesion_types, schema, setting):
    """``logits`` ``(N, K, *spatial)`` (a tensor) whose argmax is that of the maps
    :func:`resolve_unrequested_lesions` leaves: with ``remove``, the classes of lesion types a
    map's request leaves at 0 set to -inf (a copy); with ``keep``, ``logits`` as given. The
    sampling calibration is fitted on these, so that it judges the maps the samples become: a few
    leaked voxels of an unrequested type in some maps and not in others lower their pairwise Dice
    by a whole class, a diversity the samples do not have."""
    _check_unrequested_lesions(setting)
    if setting == "keep":
        return logits
    out = logits.clone()
    for i, classes in enumerate(_unrequested_classes(conditioning, lesion_types, schema)):
        if classes:
            out[i, classes] = float("-inf")
    return out


@torch.no_grad()
def sample_labels(vae_path, ldm_path, conditioning, scheduler=None, steps=None, seed=0, *, batch_size=None,
                  device="auto", eta=None, progress=True, sampling=None, calibration=None, log_probs=False):
    """Sample ``N`` probabilistic label maps ``(N, K, *spatial)`` float32 (channels sum to 1; their
    logarithms where ``log_probs``, exact where a probability underflows).

    ``scheduler`` ``ddpm`` runs all training timesteps; ``ddim`` runs ``steps``
    (default: the config's ``sampling.inference_steps``). The initial noise of
    sample ``i`` comes from a generator seeded with ``(seed, i)``; DDPM/DDIM(eta>0)
    step noise from one per batch: same seed and batch size -> same maps.
    ``sampling``: a ``label_generator.sampling`` dict overriding the one stored with the
    LDM; explicit arguments override both. ``calibration``: the VAE's class offsets and temperature
    (:func:`calibrate_label_vae`), none: the decoder as trained; where it holds a deformation
    (rule fit_label_sampling), map ``i`` is warped by its own random smooth field drawn from
    ``(seed, i)`` (:mod:`.deformation`).
    """
    dev = C.get_device(device)
    vae, vpay = load_vae(vae_path, dev, calibration)
    unet, lpay = load_ldm(ldm_path, dev)
    samp = sampling_config(lpay, sampling)
    field = load_deformation(calibration_record(calibration))  # ({phenotype: std mm}, voxel mm) or None
    kind = scheduler or samp["scheduler"]
    bs = int(batch_size or samp["batch_size"])
    eta = float(samp.get("ddim_eta", 0.0) if eta is None else eta)
    guidance = float(samp["guidance_scale"])
    compose = bool(samp.get("compose_lesion_types", False))
    negate = bool(samp.get("negate_unrequested", False))
    amp = C.sampling_amp(dev, lpay["config"].get("amp", False))
    concat = bool(lpay["config"]["ldm"].get("condition_channels", False))
    presence = bool(lpay["config"]["ldm"].get("lesion_presence", False))
    if int(lpay["unet_kwargs"]["cross_attention_dim"]) != context_dim(len(lpay["lesion_types"]), presence):
        raise InputError("this LDM model file predates the null context of classifier-free guidance",
                         file=ldm_path, fix="retrain it (rerun train_label_ldm)")
    if guidance != 1.0 and not float(lpay["config"]["ldm"].get("condition_dropout", 0.0)) > 0:
        raise InputError(f"guidance_scale {guidance} needs an LDM trained with ldm.condition_dropout > 0",
                         field="label_generator.sampling.guidance_scale",
                         fix="set guidance_scale: 1.0, or retrain the LDM with condition_dropout (e.g. 0.15)")
    cond = np.asarray(conditioning, dtype=np.float32)
    types = lpay["lesion_types"]
    if cond.ndim != 2 or cond.shape[1] != len(types):
        raise InputError(f"conditioning must be (N, {len(types)}) for lesion types {types}, got {cond.shape}")
    if field is not None:  # each map's field as large as fitted for the phenotype it asks for
        field_stds = map_stds(field[0], conditioning_phenotypes(cond, types))
    typical = typical_lesion_values(lpay["train_conditioning"]) if negate else None
    weights = compose_weights(samp.get("compose_weight", 1.0), types)
    clip = None
    if samp.get("clip_x0", True) and lpay.get("latent_range") is not None:
        lo, hi = lpay["latent_range"]
        margin = float(samp.get("clip_margin", 0.1)) * (hi - lo)
        clip = (lo - margin, hi + margin)
    sched = build_scheduler(kind, lpay["scheduler_kwargs"], clip)
    T = int(lpay["scheduler_kwargs"]["num_train_timesteps"])
    if kind == "ddpm":
        if steps not in (None, T):
            log.info("DDPM sampling runs all %d training timesteps (requested %s); use ddim for fewer", T, steps)
        n_steps = T
    else:
        n_steps = int(steps or samp["inference_steps"])
    sched.set_timesteps(n_steps, device=dev)
    lat_c = int(lpay["unet_kwargs"]["out_channels"])
    bshape = (1, lat_c) + (1,) * (len(lpay["latent_shape"]))
    lat_scale = torch.tensor(lpay.get("latent_scale", [lpay["scale_factor"]] * lat_c)).view(bshape).to(dev)
    lat_shift = latent_shift_tensor(lpay.get("latent_shift", [0.0] * lat_c), lat_c,
                                    len(lpay["latent_shape"])).to(dev)
    lpad = list(lpay["padded_latent_shape"])
    lshape = list(lpay["latent_shape"])
    out = []
    n = cond.shape[0]
    for b0 in range(0, n, bs):
        b1 = min(n, b0 + bs)
        noise = torch.stack([torch.randn([lat_c] + lpad, generator=C.generator(int(seed) * 1_000_003 + i))
                             for i in range(b0, b1)]).to(dev)
        g = C.generator(int(seed) * 7919 + b0 + 1, dev)
        ctx = condition_context(cond[b0:b1], presence=presence).to(dev)
        null = torch.zeros_like(ctx)
        x = noise
        composed = negate or (compose and bool((np.count_nonzero(cond[b0:b1], axis=1) > 1).any()))
        contexts = composed_contexts(cond[b0:b1], typical if negate else None, presence) if composed else None
        for t in sched.timesteps:
            tt = torch.full((b1 - b0,), int(t), device=dev, dtype=torch.long)
            with C.autocast(dev, amp):
                if composed:
                    pred = _composed_prediction(unet, x, tt, contexts, cond[b0:b1], guidance, concat, dev, negate,
                                                weights)
                elif guidance == 1.0:
                    pred = unet(x=with_condition_channels(x, ctx, concat), timesteps=tt, context=ctx).float()
                else:  # conditioned and null context in one batch
                    both = torch.cat([ctx, null])
                    out2 = unet(x=with_condition_channels(torch.cat([x, x]), both, concat),
                                timesteps=torch.cat([tt, tt]), context=both).float()
                    pred, pred_null = out2.chunk(2)
                    pred = pred_null + guidance * (pred - pred_null)
            if kind == "ddpm":
                x, _ = sched.step(pred, int(t), x, generator=g)
            else:
                x, _ = sched.step(pred, int(t), x, eta=eta, generator=g)
        z = C.crop_to(x, lshape) / lat_scale + lat_shift
        with C.autocast(dev, amp):
            logits = decoded_logits(vae, z)
        if field is None and not log_probs:
            prob = C.crop_to(torch.softmax(logits.float(), dim=1), vpay["shape"])
        else:
            prob = C.crop_to(torch.log_softmax(logits.float(), dim=1), vpay["shape"]).cpu()
            if field is not None:  # warped on the working grid, as fitted
                prob = torch.log_softmax(deform(prob, field_stds[b0:b1], field[1], seed, first_index=b0), dim=1)
            prob = prob if log_probs else torch.exp(prob)
        out.append(prob.cpu().numpy().astype(np.float32))
        if progress:
            log.info("sampled label maps %d/%d (%s, %d steps)", b1, n, kind, n_steps)
    return np.concatenate(out)
