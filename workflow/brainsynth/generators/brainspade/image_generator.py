"""Image generator: a 2-D SPADE VAE-GAN turning probabilistic label slices into MR slices.

One network (monai ``SPADENet``, ``is_vae=True``, wrapped by :class:`StyleSPADENet`)
for all modalities: its encoder maps a *style* slice to a style code ``z``; the
SPADE decoder renders the label slice in that style, so the style image selects
the modality (and the contrast of the source scanner). With ``style_channels > 0``
(demo default) ``z`` also joins the SPADE conditioning, which makes short
trainings respect the style; ``0`` is the plain brainSPADE network. Volumes are
generated axial slice by slice.

Training (:func:`train_image_generator`)
----------------------------------------
Each batch item: a subject, a modality and an axial slice ``z`` with brain (with
``rare_class_oversample``, that share of the items comes from slices holding a lesion); the
target is that subject's image at ``z``, the label input its probabilistic map
at ``z`` and the style input the same subject/modality at another axial
position ``z'`` (unpaired style/label). Losses of the generator:

* hinge adversarial, monai ``MultiScalePatchDiscriminator`` on
  ``concat(label, image)`` (``PatchAdversarialLoss(criterion="hinge")``),
* discriminator feature matching (L1 between the discriminators' intermediate
  features of the real and the generated slice),
* KLD of the style code,
* slice consistency: ``1 - cos(mu(x), mu(A(x)))`` for the style slice ``x`` and a
  random affine transform ``A`` of it (rotation, scaling, translation),
* optional L1 reconstruction (a stand-in when no perceptual weights exist),
* optional class-balanced L1 (each label class's mean error counts alike: lesions of a
  few dozen voxels keep their contrast instead of taking white matter's),
* optional perceptual loss (local ResNet-50 weights only, never downloaded),
* optional modality-classifier loss: a small CNN trained on real slices to
  predict the modality; the generator is penalised when its output is
  classified as another modality than the style's.

``patch_size`` switches on patch-based training (random crops) and inference
with ``monai.inferers.sliding_window_inference`` (for grids too large to train
on whole slices).

Config (``image_generator:`` in config.yaml; defaults in :data:`DEFAULTS`)
------------------------------------------------------------------------
=========================  =============================================================
key                        meaning
=========================  =============================================================
device / amp / seed        as for the label generator (amp: float16 training and sampling on CUDA,
                           bfloat16 sampling on CPUs with AMX)
num_threads                torch CPU threads
checkpoint_every/log_every steps between checkpoints / progress lines
steps / batch_size         optimisation steps / slices per step
channels                   encoder channels per level (decoder: reversed); slices are
                           padded to multiples of 2**len(channels)
z_dim                      style-code size
style_channels             0: plain SPADENet (brainSPADE); > 0: the style code, linearly
                           projected to this many channels and broadcast over the slice,
                           joins the label map as SPADE conditioning (see StyleSPADENet)
spade_hidden               hidden channels of the SPADE normalisation blocks
norm                       instance | batch: SPADE's parameter-free normalisation
output_block_channels      0: MONAI's decoder alone, whose last SPADE block works at half
                           resolution on a nearest-neighbour copy of the label map (three of
                           four voxels of a slice never reach the image); N: the decoder ends on
                           N channels and one more SPADE residual block at full resolution
                           draws the image (brainSPADE's generator ends the same way)
last_act                   sigmoid | null (linear, clamped to [0, 1] at inference)
lr_g / lr_d / betas        Adam settings of generator and discriminator(+classifier)
disc.num_d                 discriminators of the multi-scale discriminator
disc.num_layers_d          layers of the first discriminator
disc.channels / disc.norm  width / normalisation of the discriminators
weights.adv                hinge adversarial weight
weights.feature_matching   discriminator feature matching weight
weights.kld                KL weight of the style code
weights.slice_consistency  style-code cosine consistency weight
weights.l1                 L1 reconstruction weight (0 in the paper setting)
weights.class_l1           class-balanced L1: the mean over the label classes present in
                           the slice of each class's mean L1, so a lesion of 20 voxels
                           weighs as much as white matter (its contrast is otherwise lost)
weights.perceptual         perceptual weight (needs perceptual_weights_path)
weights.modality           modality-classifier weight (0 disables the classifier)
perceptual_weights_path    local ResNet-50 state dict for the perceptual loss
augment.rotate_deg/scale/translate   random affine of the slice-consistency loss
patch_size                 null (whole slices) or [h, w] for patch training
sw_overlap / sw_batch_size sliding-window inference settings (patch mode)
style_code                 mean (use mu at inference) | sample (mu + sigma*eps, seeded)
rare_class_oversample      share of the batch drawn from slices holding a rare class
                           (< 1% of the training voxels: lesions), the class drawn first
mask_background            zero voxels whose label is background (p_bg >= 0.5)
min_brain_voxels           a slice needs this many brain voxels to be used
=========================  =============================================================
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputError
from .. import common as C

log = logging.getLogger("brainsynth.generators.image")

DEFAULTS = {  # demo scale: axial slices of the 48x56x48 grid on 2 CPU cores
    "device": "auto",
    "amp": True,
    "seed": 0,
    "num_threads": None,
    "checkpoint_every": 50,
    "log_every": 10,
    "steps": 4000,
    "batch_size": 4,
    "channels": [16, 32, 64],
    "z_dim": 16,
    "style_channels": 8,
    "spade_hidden": 32,
    "norm": "instance",
    # a full-resolution SPADE block after MONAI's decoder (which sees the labels at half resolution
    # only): re-imaging error halved, the fixed frontal bright spot gone (README, "Image generator levers")
    "output_block_channels": 16,
    "last_act": "sigmoid",
    "lr_g": 2e-4,
    "lr_d": 2e-4,
    "betas": [0.5, 0.999],
    "disc": {"num_d": 2, "num_layers_d": 2, "channels": 16, "norm": "INSTANCE"},
    "weights": {
        "adv": 1.0,
        "feature_matching": 10.0,
        "kld": 0.05,
        "slice_consistency": 1.0,
        "l1": 1.0,
        # with rare_class_oversample: lesion contrast and FLAIR's grey/white order on held-out
        # subjects; 10 (was 3) with 0.75 halves the lesion error (README, "Image generator levers")
        "class_l1": 10.0,
        "perceptual": 0.0,
        "modality": 0.0,
    },
    "perceptual_weights_path": None,
    "augment": {"rotate_deg": 10.0, "scale": 0.1, "translate": 0.05},
    "patch_size": None,
    "sw_overlap": 0.25,
    "sw_batch_size": 4,
    "style_code": "mean",
    "rare_class_oversample": 0.75,
    "mask_background": True,
    "min_brain_voxels": 10,
}


# Paper scale (axial slices of 96x128x96 at 2 mm, one GPU): overrides of DEFAULTS (demo scale).
# Step counts are budgets, not values taken from the paper; the perceptual term needs local weights.
PAPER = {
    "steps": 100000,
    "batch_size": 8,
    "channels": [32, 64, 128, 256],
    "z_dim": 32,
    "style_channels": 0,  # plain SPADENet as in brainSPADE (style through fc(z) only; needs long training)
    "spade_hidden": 64,
    "norm": "batch",  # brainSPADE: spectralspadesyncbatch3x3
    "output_block_channels": 32,  # brainSPADE's last SPADE block: full resolution, then one conv to the image
    "lr_g": 1e-4,
    "lr_d": 4e-4,
    "betas": [0.0, 0.9],
    "disc": {"num_d": 2, "num_layers_d": 2, "channels": 64, "norm": "INSTANCE"},
    "weights": {"adv": 1.0, "feature_matching": 10.0, "kld": 0.05, "slice_consistency": 1.0, "l1": 0.0,
                "class_l1": 0.0, "perceptual": 1.0, "modality": 1.0},
    "rare_class_oversample": 0.0,  # the study's losses and sampling; the demo's class terms are levers
}


NORMS = ("instance", "batch")  # SPADE's parameter-free normalisation (brainSPADE: synchronised batch norm)


def resolve_config(cfg):
    return C.resolve_preset(DEFAULTS, PAPER, cfg, where="image_generator")


# --------------------------------------------------------------------------- networks


class ModalityClassifier(nn.Module):
    """Tiny CNN: a 1-channel slice -> modality logits."""

    def __init__(self, n_modalities, width=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, n_modalities))

    def forward(self, x):
        return self.net(x)


class StyleSPADENet(nn.Module):
    """monai ``SPADENet`` (VAE-GAN) with optional style-conditioned SPADE modulation.

    ``style_channels == 0``: exactly ``SPADENet`` (the style code enters only through
    the decoder's input ``fc(z)``, as in brainSPADE). ``style_channels > 0``: the
    SPADE conditioning becomes ``concat(label, broadcast(Linear(z)))`` so every
    normalisation layer sees the style; the decoder otherwise tends to ignore ``z``
    (its input is instance-normalised away) until trained for long, and then
    renders every modality alike.
    """

    def __init__(self, net_kwargs, style_channels=0, output_block_channels=0):
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets import SPADENet
        from monai.networks.nets.spade_network import SPADENetResBlock

        kw = dict(net_kwargs)
        kw["channels"] = list(kw["channels"])  # SPADENet reverses/extends the list in place
        kw["input_shape"] = list(kw["input_shape"])
        self.style_channels = int(style_channels or 0)
        kw["label_nc"] = int(kw["label_nc"]) + self.style_channels
        self.output_block = None
        width = int(output_block_channels or 0)
        if width:
            last_act = kw["last_act"]
            kw.update(out_channels=width, last_act=("LEAKYRELU", {"negative_slope": 0.2}))
            self.output_block = SPADENetResBlock(2, width, width, kw["label_nc"],
                                                 kw["spade_intermediate_channels"], kw["norm"])
            self.to_image = Convolution(2, width, int(net_kwargs["out_channels"]), kernel_size=3, norm=None,
                                        act=last_act, conv_only=last_act is None)
        self.net = SPADENet(**kw)
        self.style_proj = nn.Linear(int(kw["z_dim"]), self.style_channels) if self.style_channels else None

    @property
    def encoder(self):
        return self.net.encoder

    def condition(self, seg, z):
        if self.style_proj is None:
            return seg
        st = self.style_proj(z)[:, :, None, None].expand(-1, -1, *seg.shape[2:])
        return torch.cat([seg, st.to(seg.dtype)], 1)

    def decode(self, seg, z):
        cond = self.condition(seg, z)
        x = self.net.decoder(cond, z)
        if self.output_block is None:
            return x
        return self.to_image(F.leaky_relu(self.output_block(x, cond), 0.2))

    def forward(self, seg, x):
        mu, logvar = self.net.encoder(x)
        z = self.net.encoder.reparameterize(mu, logvar)
        return self.decode(seg, z), mu, logvar


def build_generator(kwargs, style_channels=0, output_block_channels=0):
    return StyleSPADENet(kwargs, style_channels, output_block_channels)


def _net_kwargs(cfg, n_classes, input_shape):
    la = cfg["last_act"]
    return dict(spatial_dims=2, in_channels=1, out_channels=1, label_nc=int(n_classes),
                input_shape=[int(s) for s in input_shape], channels=[int(c) for c in cfg["channels"]],
                z_dim=int(cfg["z_dim"]), is_vae=True, spade_intermediate_channels=int(cfg["spade_hidden"]),
                norm=cfg["norm"].upper(), last_act=(la.upper() if la else None))


def load_generator(path, device="cpu"):
    payload = C.torch_load(path)
    if payload.get("kind") != "image_generator":
        raise InputError("not an image generator model file", file=path,
                         fix="pass the output of train_image_generator")
    net = build_generator(payload["net_kwargs"], payload.get("style_channels", 0),
                          payload.get("output_block_channels", 0))
    net.load_state_dict(payload["state_dict"])
    return C.guard_bf16_inference(net.to(device).eval(), "image generator"), payload


def kld_loss(mu, logvar):
    return (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)).mean()


def random_affine(x, rotate_deg=10.0, scale=0.1, translate=0.05):
    """Random 2-D affine of a batch ``(B, C, H, W)`` (global torch RNG)."""
    b = x.shape[0]
    ang = (torch.rand(b) * 2 - 1) * math.radians(rotate_deg)
    sc = 1 + (torch.rand(b) * 2 - 1) * scale
    tr = (torch.rand(b, 2) * 2 - 1) * translate * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tr[:, 0]], 1), torch.stack([sin, cos, tr[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def feature_matching(fake_feats, real_feats):
    total = 0.0
    for ff, rf in zip(fake_feats, real_feats):
        total = total + sum(F.l1_loss(a, b.detach()) for a, b in zip(ff, rf)) / max(1, len(ff))
    return total / max(1, len(fake_feats))


# --------------------------------------------------------------------------- data


def _load_training(label_paths, image_paths, min_brain):
    if not image_paths:
        raise InputError("no modality given", field="image_paths", fix="pass {modality: [paths]}")
    co = C.Cohort(label_paths, image_paths, min_brain_voxels=min_brain, dtype=np.float16)
    brain = [torch.from_numpy(zs) for zs in co.brain]
    return torch.from_numpy(co.labels), torch.from_numpy(co.images), brain, co.modalities, co.shape


def rare_class_slices(labels, brain, min_voxels=3):
    """Subject index -> list of axial index arrays, one per rare class the subject holds in
    at least ``min_voxels`` voxels of a brain slice (:func:`C.rare_classes` of the cohort)."""
    frequency = labels.float().mean(dim=(0, 2, 3, 4))
    rare = C.rare_classes(frequency)
    out = {}
    for s in range(labels.shape[0]):
        per = []
        for c in rare:
            counts = (labels[s, c] > 0.5).sum(dim=(0, 1))
            zs = torch.as_tensor([int(z) for z in brain[s] if int(counts[int(z)]) >= min_voxels])
            if len(zs):
                per.append(zs)
        if per:
            out[s] = per
    return rare, out


def class_balanced_l1(fake, target, seg):
    """Mean over the classes present in the batch (argmax of ``seg``, background excluded) of
    each class's mean absolute error over its voxels in the batch."""
    hard = F.one_hot(seg.argmax(1), seg.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(fake.dtype)
    count = hard.sum(dim=(0, 2, 3))
    err = ((fake - target).abs() * hard).sum(dim=(0, 2, 3))
    present = count > 0
    return (err[present] / count[present]).mean() if bool(present.any()) else fake.sum() * 0


def _random_crop_pos(shape, patch):
    return [int(torch.randint(0, s - p + 1, (1,))) for s, p in zip(shape, patch)]


def _crop(x, pos, patch):
    return x[..., pos[0]:pos[0] + patch[0], pos[1]:pos[1] + patch[1]]


# --------------------------------------------------------------------------- training


def _check_disc_size(dcfg, net_shape):
    """The deepest discriminator halves its input num_layers_d * num_d times; instance norm needs
    maps of at least 2x2 there."""
    need = 2 ** (int(dcfg["num_layers_d"]) * int(dcfg["num_d"]))
    if str(dcfg["norm"]).upper().startswith("INSTANCE"):
        need *= 3
    if min(net_shape) < need:
        raise InputError(f"slices/patches of {net_shape} are too small for {dcfg['num_d']} discriminators "
                         f"with {dcfg['num_layers_d']} layers (need >= {need} voxels per side)",
                         field="image_generator.disc", fix="reduce disc.num_d or disc.num_layers_d")


def _batch(data, bs, device):
    """``bs`` training slices: (label map, target image, style slice of the same subject and
    modality at another level, modality index), padded (and cropped to the patch); a share
    ``oversample`` of them from slices holding a rare class."""
    padded, patch, rare_slices = data["padded"], data["patch"], data["rare_slices"]
    rare_subjects = list(rare_slices)
    segs, tgts, stys, ms = [], [], [], []
    for _ in range(bs):
        zc = None
        if rare_subjects and float(torch.rand(())) < data["oversample"]:
            s = rare_subjects[int(torch.randint(len(rare_subjects), (1,)))]
            zc = rare_slices[s][int(torch.randint(len(rare_slices[s]), (1,)))]
        else:
            s = int(torch.randint(data["labels"].shape[0], (1,)))
        m = int(torch.randint(data["n_modalities"], (1,)))
        zs = data["brain"][s]
        zc = zs if zc is None else zc
        z = int(zc[torch.randint(len(zc), (1,))])
        others = zs[zs != z] if len(zs) > 1 else zs
        z2 = int(others[torch.randint(len(others), (1,))])
        seg = C.pad_background(data["labels"][s, :, :, :, z][None].float(), padded)[0]
        tgt = C.pad_to(data["images"][s, m, :, :, z][None, None].float(), padded)[0]
        sty = C.pad_to(data["images"][s, m, :, :, z2][None, None].float(), padded)[0]
        if patch is not None:
            pos = _random_crop_pos(padded, patch)
            seg, tgt = _crop(seg, pos, patch), _crop(tgt, pos, patch)
            sty = _crop(sty, _random_crop_pos(padded, patch), patch)
        segs.append(seg)
        tgts.append(tgt)
        stys.append(sty)
        ms.append(m)
    return (torch.stack(segs).to(device), torch.stack(tgts).to(device), torch.stack(stys).to(device),
            torch.tensor(ms, device=device))


def _generator_losses(net, disc, clf, adv, perc, w, seg, tgt, sty, sty_aug, mlab):
    """The generated slices and the generator's loss terms (``loss_g``: their weighted sum):
    hinge adversarial, discriminator feature matching, KL of the style code, slice consistency
    of the style code under augmentation, L1 / class-balanced L1 / perceptual where weighted, and
    the modality classifier's cross-entropy when ``clf`` is given."""
    zero = torch.zeros((), device=seg.device)
    fake, mu, logvar = net(seg, sty)
    fake = fake.float()
    d_fake, f_fake = disc(torch.cat([seg, fake], 1))
    with torch.no_grad():
        _, f_real = disc(torch.cat([seg, tgt], 1))
    g_adv = adv(d_fake, target_is_real=True, for_discriminator=False)
    fm = feature_matching(f_fake, f_real)
    kld = kld_loss(mu.float(), logvar.float())
    mu_aug, _ = net.encoder(sty_aug)
    sc = (1 - F.cosine_similarity(mu.float(), mu_aug.float(), dim=1, eps=1e-6)).mean()
    l1 = F.l1_loss(fake, tgt) if float(w["l1"]) > 0 else zero
    cl1 = class_balanced_l1(fake, tgt, seg) if float(w["class_l1"]) > 0 else zero
    p_loss = perc(fake, tgt) if perc is not None else zero
    cls = F.cross_entropy(clf(fake), mlab) if clf is not None else zero
    loss_g = (float(w["adv"]) * g_adv + float(w["feature_matching"]) * fm + float(w["kld"]) * kld
              + float(w["slice_consistency"]) * sc + float(w["l1"]) * l1 + float(w["class_l1"]) * cl1
              + float(w["perceptual"]) * p_loss + float(w["modality"]) * cls)
    return fake, {"loss_g": loss_g, "adv": g_adv, "feature_matching": fm, "kld": kld, "slice_consistency": sc,
                  "l1": l1, "class_l1": cl1, "perceptual": p_loss, "modality_cls": cls}


def _discriminator_losses(disc, clf, adv, seg, tgt, fake, mlab):
    """Hinge loss of the discriminator on real and generated slices, and the modality
    classifier's cross-entropy on the real slices when ``clf`` is given."""
    d_fake, _ = disc(torch.cat([seg, fake.detach()], 1))
    d_real, _ = disc(torch.cat([seg, tgt], 1))
    d_loss = 0.5 * (adv(d_fake, target_is_real=False, for_discriminator=True)
                    + adv(d_real, target_is_real=True, for_discriminator=True))
    cls_real = F.cross_entropy(clf(tgt), mlab) if clf is not None else torch.zeros((), device=seg.device)
    return d_loss, cls_real


def train_image_generator(label_paths, image_paths, cfg, out_dir, *, max_steps_this_run=None, callback=None):
    """Train the SPADE VAE-GAN. ``image_paths``: dict modality -> list of paths aligned with
    ``label_paths``. Returns a dict of output paths (``model``, ``config``, ``losses_tsv``,
    ``losses_png``), or ``{"completed": False}`` when stopped by ``max_steps_this_run``.
    """
    cfg = resolve_config(cfg)
    C.check_choice(cfg["norm"], NORMS, "image_generator.norm")
    if int(cfg["output_block_channels"]) < 0:
        raise InputError(f"output_block_channels must be >= 0, got {cfg['output_block_channels']}",
                         field="image_generator.output_block_channels", fix="0 (none) or a channel count")
    out_dir = Path(out_dir)
    C.set_threads(cfg["num_threads"])
    device = C.get_device(cfg["device"])
    amp = C.amp_enabled(device, cfg["amp"])
    C.seed_everything(cfg["seed"])
    label_paths = [str(p) for p in label_paths]
    image_paths = {m: [str(p) for p in ps] for m, ps in image_paths.items()}
    labels, images, brain, mods, shape = _load_training(label_paths, image_paths, int(cfg["min_brain_voxels"]))
    n_sub, n_classes = labels.shape[:2]
    factor = 2 ** len(cfg["channels"])
    slice_shape = tuple(shape[:2])
    padded = C.divisible_shape(slice_shape, factor)
    patch = None
    if cfg["patch_size"]:
        patch = [int(p) for p in cfg["patch_size"]]
        if len(patch) != 2 or any(p % factor for p in patch):
            raise InputError(f"patch_size {patch} must be 2 sizes divisible by {factor}",
                             field="image_generator.patch_size")
        padded = tuple(max(a, b) for a, b in zip(padded, patch))
    net_shape = patch or list(padded)
    w = cfg["weights"]
    dcfg = cfg["disc"]
    min_size = min(net_shape)
    _check_disc_size(dcfg, net_shape)
    log.info("image generator: %d subjects, modalities %s, %d classes, slice %s (padded %s), patch %s, "
             "device %s, amp %s", n_sub, mods, n_classes, slice_shape, padded, patch, device, amp)

    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import MultiScalePatchDiscriminator

    nkw = _net_kwargs(cfg, n_classes, net_shape)
    net = build_generator(nkw, cfg["style_channels"], cfg["output_block_channels"]).to(device)
    disc = MultiScalePatchDiscriminator(num_d=int(dcfg["num_d"]), num_layers_d=int(dcfg["num_layers_d"]),
                                        spatial_dims=2, channels=int(dcfg["channels"]), in_channels=n_classes + 1,
                                        out_channels=1, norm=dcfg["norm"], minimum_size_im=min_size).to(device)
    use_cls = float(w["modality"]) > 0 and len(mods) > 1
    clf = ModalityClassifier(len(mods)).to(device)
    adv = PatchAdversarialLoss(criterion="hinge")
    perc = C.build_perceptual(2, w["perceptual"], cfg["perceptual_weights_path"], "image_generator")
    if perc is not None:
        perc = perc.to(device)
    betas = tuple(float(b) for b in cfg["betas"])
    opt_g = torch.optim.Adam(net.parameters(), lr=float(cfg["lr_g"]), betas=betas)
    opt_d = torch.optim.Adam(list(disc.parameters()) + list(clf.parameters()), lr=float(cfg["lr_d"]), betas=betas)
    sc_g, sc_d = C.make_scaler(device, amp), C.make_scaler(device, amp)
    bs = int(cfg["batch_size"])
    aug = cfg["augment"]
    oversample = float(cfg["rare_class_oversample"])
    rare, rare_slices = rare_class_slices(labels, brain) if oversample > 0 else ([], {})
    if oversample > 0:
        log.info("rare classes %s: %.0f%% of the batch from slices holding one (%d of %d subjects hold one)",
                 rare, 100 * oversample, len(rare_slices), n_sub)
    data = {"labels": labels, "images": images, "brain": brain, "n_modalities": len(mods), "padded": padded,
            "patch": patch, "rare_slices": rare_slices, "oversample": oversample}

    def step_fn(step):
        net.train()
        seg, tgt, sty, mlab = _batch(data, bs, device)
        sty_aug = random_affine(sty, aug["rotate_deg"], aug["scale"], aug["translate"])
        with C.autocast(device, amp):
            fake, terms = _generator_losses(net, disc, clf if use_cls else None, adv, perc, w, seg, tgt, sty, sty_aug,
                                            mlab)
        C.optimizer_step(terms["loss_g"], opt_g, sc_g)
        with C.autocast(device, amp):
            d_loss, cls_real = _discriminator_losses(disc, clf if use_cls else None, adv, seg, tgt, fake, mlab)
        C.optimizer_step(d_loss + cls_real, opt_d, sc_d)
        terms.update(disc=d_loss, cls_real=cls_real)
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}

    fp = C.config_hash(C.training_fingerprint_config(cfg),
                       C.files_fingerprint(label_paths + [p for m in mods for p in image_paths[m]]), mods,
                       "image_generator")
    history, completed, _ = C.train_loop(
        name="image_generator", total_steps=int(cfg["steps"]), step_fn=step_fn,
        modules={"net": net, "disc": disc, "clf": clf}, optimizers={"g": opt_g, "d": opt_d},
        scalers={"g": sc_g, "d": sc_d}, out_dir=out_dir, fingerprint=fp,
        checkpoint_every=cfg["checkpoint_every"], log_every=cfg["log_every"],
        max_steps_this_run=max_steps_this_run, callback=callback, device=device)
    if not completed:
        return {"completed": False, "history": history}

    payload = {"kind": "image_generator", "net_kwargs": nkw, "state_dict": C.state_dict_cpu(net),
               "style_channels": int(cfg["style_channels"]),
               "output_block_channels": int(cfg["output_block_channels"]),
               "modalities": mods, "n_classes": n_classes, "slice_shape": list(slice_shape),
               "padded_shape": list(padded), "patch_size": patch, "config": cfg,
               "classifier_state_dict": C.state_dict_cpu(clf) if use_cls else None}
    record = {"image_generator": cfg, "net_kwargs": nkw, "modalities": mods, "slice_shape": list(slice_shape),
              "padded_shape": list(padded), "n_training": n_sub}
    return C.finish_training("image_generator", out_dir, payload, record, history,
                             "image generator (SPADE VAE-GAN)")


# --------------------------------------------------------------------------- inference


def _style_slice_for(style, z, min_brain):
    """A 2-D style slice: the given 2-D array, or slice ``z`` of a 3-D volume (nearest slice with brain)."""
    style = np.asarray(style, dtype=np.float32)
    if style.ndim == 2:
        return style
    if style.ndim != 3:
        raise InputError(f"style must be a 2-D slice or a 3-D volume, got shape {style.shape}")
    counts = (style > 0).reshape(-1, style.shape[-1]).sum(0)
    ok = np.flatnonzero(counts >= min_brain)
    if len(ok) == 0:
        raise InputError("style volume contains no brain")
    zz = int(ok[np.argmin(np.abs(ok - min(z, style.shape[-1] - 1)))])
    return style[..., zz]


@torch.no_grad()
def encode_style(net, style_slices, payload, mode="mean", generator=None):
    """``(B, X, Y)`` style slices -> style codes ``(B, z_dim)``."""
    padded = payload["padded_shape"]
    x = C.pad_to(torch.as_tensor(np.asarray(style_slices), dtype=torch.float32)[:, None], padded)
    patch = payload.get("patch_size")
    if patch:
        x = C.crop_to(x, patch)
    dev = next(net.parameters()).device
    mu, logvar = net.encoder(x.to(dev))
    if mode == "sample":
        eps = torch.randn(mu.shape, generator=generator).to(dev)
        return mu + eps * torch.exp(0.5 * logvar)
    return mu


@torch.no_grad()
def generate_images(model_path, prob_label_volume, style_slices, seed=0, *, device="auto", batch_size=8,
                    style_code=None, net=None, payload=None):
    """Generate a 3-D image per modality, axial slice by slice.

    ``prob_label_volume``: ``(K, X, Y, Z)`` probabilistic map. ``style_slices``:
    dict modality -> 2-D style slice (used for every slice) or 3-D volume on the
    same grid (slice ``z`` styles output slice ``z``; slices without brain fall
    back to the nearest slice with brain). Returns dict modality -> ``(X, Y, Z)``
    float32 in [0, 1]. ``seed`` drives the style-code sampling (``style_code:
    sample``); the output is deterministic for a seed.
    """
    dev = C.get_device(device)
    if net is None or payload is None:
        net, payload = load_generator(model_path, dev)
    cfg = payload["config"]
    mode = style_code or cfg.get("style_code", "mean")
    lab = np.asarray(prob_label_volume, dtype=np.float32)
    if lab.ndim != 4 or lab.shape[0] != payload["n_classes"]:
        raise InputError(f"label volume must be (K={payload['n_classes']}, X, Y, Z), got {lab.shape}")
    if list(lab.shape[1:3]) != list(payload["slice_shape"]):
        raise InputError(f"label slices {lab.shape[1:3]} differ from the training slices {payload['slice_shape']}")
    min_brain = int(cfg.get("min_brain_voxels", 1))
    zs = C.brain_slices(lab, min_brain_voxels=1)
    padded = payload["padded_shape"]
    patch = payload.get("patch_size")
    bg = lab[0] >= 0.5
    amp = C.sampling_amp(dev, cfg.get("amp", False))
    out = {}
    for mod in style_slices:
        mi = payload["modalities"].index(mod) if mod in payload["modalities"] else len(payload["modalities"])
        if mod not in payload["modalities"]:
            log.warning("modality %s was not seen in training (trained: %s); its style image still sets "
                        "the contrast", mod, payload["modalities"])
        g = C.generator(int(seed) * 131 + mi)
        vol = np.zeros(lab.shape[1:], dtype=np.float32)
        for b0 in range(0, len(zs), batch_size):
            zb = zs[b0:b0 + batch_size]
            sty = np.stack([_style_slice_for(style_slices[mod], int(z), min_brain) for z in zb])
            seg = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lab[..., zb], -1, 0)))
            seg = C.pad_background(seg, padded).to(dev)
            with C.autocast(dev, amp):
                code = encode_style(net, sty, payload, mode, g)
                if patch:
                    from monai.inferers import sliding_window_inference

                    imgs = []
                    for j in range(seg.shape[0]):
                        cj = code[j:j + 1]
                        imgs.append(sliding_window_inference(
                            seg[j:j + 1], roi_size=patch, sw_batch_size=int(cfg.get("sw_batch_size", 4)),
                            predictor=lambda p, cj=cj: net.decode(p, cj.expand(p.shape[0], -1)),
                            overlap=float(cfg.get("sw_overlap", 0.25)), mode="gaussian"))
                    img = torch.cat(imgs)
                else:
                    img = net.decode(seg, code)
            img = C.crop_to(img.float(), payload["slice_shape"]).clamp(0, 1)[:, 0].cpu().numpy()
            vol[..., zb] = np.moveaxis(img, 0, -1)
        if cfg.get("mask_background", True):
            vol[bg] = 0.0
        out[mod] = vol
    return out
