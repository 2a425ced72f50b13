"""Shared machinery of the generators: device, AMP, seeding, checkpoint/resume, logging, data.

Training loops
--------------
Every trainer runs :func:`train_loop`, which

* resumes from ``<out_dir>/checkpoints/<name>_last.pt`` when one exists and was
  written with the same training configuration and input files (a hash of the
  config without logging/device/step-count keys and of the input files' size and
  mtime is stored; a mismatch logs a warning and starts afresh; raising ``steps``
  continues a finished run, lowering it below the checkpoint restarts),
* runs steps ``start .. total_steps`` (1-based), so a killed-and-rerun job
  continues from ``last checkpoint step + 1`` and ends after exactly
  ``total_steps`` steps; the loss history holds every step exactly once,
* saves a checkpoint atomically every ``checkpoint_every`` steps and at the end:
  model(s), optimiser(s), AMP scaler(s), step, loss history and the RNG states of
  ``torch`` (CPU and CUDA), ``numpy`` and ``random``. All training randomness
  comes from these global generators, so an interrupted-and-resumed CPU run
  gives the same weights as an uninterrupted run with the same seed,
* logs ``step/total``, the losses and it/s every ``log_every`` steps,
* writes the loss curves as TSV and PNG.

``max_steps_this_run`` (stop after that many steps, checkpointing first) and
``callback(step)`` (called after every step; may raise) exist to test and to
split long trainings over several jobs.

Data conventions
----------------
Probabilistic label map: 4-D NIfTI ``(X, Y, Z, K)`` float32, ``K`` = all classes
of the schema in value order (background first), channels summing to 1.
Images: one 3-D NIfTI per modality, intensities in [0, 1], 0 outside the brain.
Axial slices are taken along the last spatial axis (``Z``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..model_files import torch_load, torch_save
from ..io import save_figure, save_json, save_table

log = logging.getLogger("brainsynth.generators")


# --------------------------------------------------------------------------- config


def merge_config(defaults, cfg, where="config"):
    """Deep-merge ``cfg`` over ``defaults``; unknown keys raise :class:`InputError`."""
    out = copy.deepcopy(defaults)
    for key, val in (cfg or {}).items():
        if key not in defaults:
            raise InputError(
                f"unknown key {key!r}",
                field=f"{where}.{key}",
                fix=f"use one of {sorted(defaults)}",
            )
        if isinstance(defaults[key], dict) and isinstance(val, dict):
            out[key] = merge_config(defaults[key], val, where=f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(val)
    return out


PRESETS = ("demo", "paper")


def resolve_preset(defaults, paper, cfg, where):
    """``cfg`` over the demo-scale ``defaults``, or, with ``preset: paper``, over ``defaults``
    updated by the study-scale ``paper`` settings (one config line for paper-scale runs)."""
    cfg = dict(cfg or {})
    preset = cfg.pop("preset", "demo")
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}", field=f"{where}.preset", fix=f"use one of {list(PRESETS)}")
    base = merge_config(defaults, paper, where=where) if preset == "paper" else defaults
    return merge_config(base, cfg, where=where)


PRESET_SECTIONS = ("label_generator", "image_generator", "spade_diffusion")


def paper_sections_from_run(run_config, sections=PRESET_SECTIONS):
    """``{name: section}``: every generator section that the run's own settings (``run_config``:
    its config files and ``--config``, merged) set to ``preset: paper``, as given there alone. Why:
    Snakemake merges the run's files into the repository's config.yaml key by key, so the demo's
    budgets there (4000 LDM steps, its VAE, its learning rates) would override the study's PAPER
    settings in a paper run; the workflow puts these sections in place of the merged ones."""
    run_config = run_config or {}
    return {name: copy.deepcopy(run_config[name]) for name in sections
            if isinstance(run_config.get(name), dict) and run_config[name].get("preset") == "paper"}


def files_fingerprint(paths):
    """(path, size, mtime) of each file: a checkpoint is reused only for unchanged inputs."""
    out = []
    for p in paths:
        p = Path(p)
        st = p.stat() if p.exists() else None
        out.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


# settings that do not change what a training step computes: a checkpoint stays valid across them
NON_TRAINING_KEYS = {"log_every", "checkpoint_every", "num_threads", "device", "steps", "sampling",
                     "style_code", "mask_background", "sw_overlap", "sw_batch_size"}


def training_fingerprint_config(cfg):
    """``cfg`` without :data:`NON_TRAINING_KEYS` (at any depth), for checkpoint fingerprints.

    ``steps`` is left out so that raising the number of steps continues a finished training.
    """
    if isinstance(cfg, dict):
        return {k: training_fingerprint_config(v) for k, v in cfg.items() if k not in NON_TRAINING_KEYS}
    return cfg


def config_hash(*objs):
    """Stable short hash of JSON-able objects (configs, input paths)."""
    txt = json.dumps(objs, sort_keys=True, default=str)
    return hashlib.sha1(txt.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- device / seeds


def get_device(pref="auto"):
    """``auto`` -> CUDA when available, else CPU; or an explicit torch device string."""
    if pref in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available",
                         field="device", fix="set device: auto or cpu")
    return dev


def cpu_bf16_kernels():
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_fast():
    """Whether bfloat16 beats float32 on this CPU: with AMX tiles only. Measured on the demo's
    networks (README, Timings): with AMX the label VAE trains 2.35x and the LDM 1.8x faster in
    bfloat16; on AVX-512 with bfloat16 instructions but no AMX, bfloat16 was 1.6x (VAE), 1.4x
    (LDM) and 1.75x (sampling) slower than float32."""
    try:
        return cpu_bf16_kernels() and bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device):
    """The half type of ``device``: float16 on CUDA, bfloat16 on a CPU where it is faster than
    float32 (:func:`cpu_bf16_fast`), else None."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16_fast():
        return torch.bfloat16
    return None


def amp_enabled(device, want=True):
    """Mixed-precision training: CUDA only (the image generators: bfloat16 gains them about a
    tenth on the demo's CPU, not worth changing their numerics; the label generator's trainers
    use :func:`training_amp`)."""
    return bool(want) and torch.device(device).type == "cuda"


_CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                 torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _bf16_mismatch(first, second, ref, tolerance):
    """Why bfloat16 results ``first`` / ``second`` (two runs of one call) are unusable against
    float32's ``ref`` (pairs of what: tensor), or None."""
    for (what, a), (_, b), (_, r) in zip(first, second, ref):
        if not torch.equal(a, b):
            return f"two bfloat16 runs differ ({what})"
        scale = float(r.abs().max()) or 1.0
        if not torch.isfinite(a).all() or float((a.float() - r).abs().max()) > tolerance * scale:
            return f"bfloat16 {what} far from float32's"
    return None


def _conv_name(mod, x):
    return f"{type(mod).__name__}({mod.in_channels}->{mod.out_channels}, stride {mod.stride}) on {list(x.shape)}"


def bf16_convolution_problem(model, example, tolerance=0.1):
    """Why oneDNN's bfloat16 convolutions cannot train ``model`` on this CPU, or None.

    At some small strided 3-D shapes they read memory they never wrote (a stride-2 conv3d from
    256 channels on 2x3x2 voxels returns values near 1e32 that change run to run), so every
    convolution ``example()`` calls is rerun on its own input, forward and backward: twice in
    bfloat16 (must agree bit for bit) and once in float32 (the bfloat16 output and gradients
    within ``tolerance`` of its largest value). The global random generators are left as they
    were, so training draws the same batches either way.
    """
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].detach())))
             for m in model.modules() if isinstance(m, _CONVOLUTIONS)]
    was_training = model.training
    model.eval()  # no running statistics updated, no dropout drawn
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            example()
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for mod, x in calls:
        key = (id(mod), tuple(x.shape))
        if key in seen:
            continue
        seen.add(key)
        upstream = None
        runs = []
        for bf16 in (False, True, True):
            xi = x.float().clone().requires_grad_(True)
            mod.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = mod(xi)
            if upstream is None:
                upstream = torch.randn(y.shape, generator=gen)
            y.float().backward(upstream)
            runs.append([("output", y.detach().float()), ("input gradient", xi.grad),
                         ("weight gradient", mod.weight.grad.clone())])
        mod.zero_grad(set_to_none=True)
        problem = _bf16_mismatch(runs[1], runs[2], runs[0], tolerance)
        if problem:
            return f"{_conv_name(mod, x)}: {problem}"
    return None


def guard_bf16_inference(model, what, tolerance=0.1):
    """Forward hooks on every convolution of ``model`` (sampling): under CPU bfloat16 autocast
    the first call at each input shape is checked like :func:`bf16_convolution_problem`
    (forward only), and a layer that fails answers in float32 at that shape from then on, with
    a warning. Outside CPU autocast the hooks do nothing. Returns ``model``."""
    verdicts = {}
    busy = []

    def hook(mod, args, out):
        if busy or not torch.is_autocast_enabled("cpu"):
            return None
        x = args[0]
        key = (id(mod), tuple(x.shape))
        if verdicts.get(key):
            return None
        busy.append(True)
        try:
            with torch.autocast("cpu", enabled=False):
                ref = mod(x.float())
            if key not in verdicts:
                problem = _bf16_mismatch([("output", out)], [("output", mod(x))], [("output", ref)], tolerance)
                verdicts[key] = problem is None
                if problem:
                    log.warning("%s: %s: %s; this layer runs in float32 at this shape", what, _conv_name(mod, x),
                                problem)
        finally:
            busy.clear()
        return None if verdicts[key] else ref

    for m in model.modules():
        if isinstance(m, _CONVOLUTIONS):
            m.register_forward_hook(hook)
    return model


def training_amp(device, want, model, example, what):
    """Mixed-precision training of ``model``: on CUDA when wanted (float16); on a CPU where
    bfloat16 is faster (:func:`cpu_bf16_fast`) when wanted and :func:`bf16_convolution_problem`
    finds none in the convolutions ``example()`` runs (in the 2026-12-05 demo the label VAE
    trained 2.35x, the LDM 1.8x faster); else float32. Deterministic per thread count like float32, so a resumed
    training equals an uninterrupted one (the precision is part of the checkpoint fingerprint).
    The choice is logged under ``what``."""
    amp = bool(want) and amp_dtype(device) is not None
    if amp and torch.device(device).type == "cpu":
        problem = bf16_convolution_problem(model, example)
        if problem:
            log.warning("%s: training in float32, not bfloat16: %s", what, problem)
            amp = False
    log.info("%s: mixed precision %s", what, amp and amp_dtype(device))
    return amp


def training_layout(model, device, amp):
    """Put ``model`` in the memory layout its training steps run fastest in, and name it (the
    name belongs in the checkpoint fingerprint: the layouts round differently). Float32 training
    of 3-D convolutions on a CPU goes channels-last: oneDNN's backward convolutions run the label
    VAE's steps 17% and the LDM's 20% faster there (2-core AMD EPYC without AVX-512, 2026-12-06,
    bit-reproducible). bfloat16 and CUDA keep the default layout, where no gain was measured."""
    conv3d = any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    if conv3d and torch.device(device).type == "cpu" and not amp:
        model.to(memory_format=torch.channels_last_3d)
        return "channels_last_3d"
    return "contiguous"


def sampling_amp(device, want=True):
    """Mixed-precision sampling where ``device`` has a fast half type (:func:`amp_dtype`): the
    forward passes are reproducible, and the label LDM's run 2.3x faster in bfloat16 on the
    demo's CPU."""
    return bool(want) and amp_dtype(device) is not None


def autocast(device, enabled):
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=amp_dtype(device) or torch.bfloat16, enabled=bool(enabled))


def make_scaler(device, enabled):
    """Loss scaling for float16 (CUDA); bfloat16 has float32's range and needs none."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind, enabled=bool(enabled) and kind == "cuda")


def optimizer_step(loss, opt, scaler):
    """One (mixed-precision) update of ``opt``'s parameters from ``loss``: the gradients are cleared
    first, so whatever an earlier backward left in them (a generator loss flowing through the
    discriminator) does not count."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def seed_everything(seed):
    """Seed torch (CPU+CUDA), numpy and random; logged."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    log.info("seed: %d (torch, numpy, random)", seed)
    return seed


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_choice(value, choices, field):
    """``value`` when it is one of ``choices``; an error naming the config ``field`` and the
    choices otherwise (one refusal for every enumerated setting)."""
    if value not in choices:
        raise InputError(f"unknown {field.rsplit('.', 1)[-1]} {value!r}", field=field,
                         fix=f"use one of {list(choices)}")
    return value


def diffusion_target(scheduler, prediction_type, x0, noise, t):
    """What a diffusion network learns to predict: the noise (epsilon), the velocity (v: usable
    x0 estimates at high noise after a short training) or the clean sample."""
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if prediction_type == "sample" else noise


def set_threads(n=None):
    """Limit torch intra-op threads (default: $OMP_NUM_THREADS or 1)."""
    n = int(n or os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(max(1, n))
    return n


def rng_state():
    st = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    torch.set_rng_state(st["torch"])
    name, key, *rest = st["numpy"]  # the key array is saved as a tensor (see plain_data)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(st["random"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def generator(seed, device="cpu"):
    g = torch.Generator(device=torch.device(device).type)
    g.manual_seed(int(seed) % (2**63))
    return g


# --------------------------------------------------------------------------- saving models


def state_dict_cpu(module):
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def frozen_copy(module):
    """A copy of ``module`` in eval mode with no gradients: weights held beside a training (an EMA,
    the best checkpoint) without being trained."""
    held = copy.deepcopy(module)
    for p in held.parameters():
        p.requires_grad_(False)
    return held.eval()


def ema_copy(module):
    """The frozen copy that :func:`ema_update` keeps as the exponential moving average of
    ``module``'s weights (diffusion models sample from the average: a briefly trained model's last
    weights carry the noise of its last steps)."""
    return frozen_copy(module)


@torch.no_grad()
def ema_update(ema, module, decay, step):
    """One EMA step with the usual warm-up (``min(decay, (1 + step) / (10 + step))``), so the
    average is not dominated by the random initial weights in a short training."""
    d = min(float(decay), (1.0 + step) / (10.0 + step))
    for pe, pm in zip(ema.parameters(), module.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1.0 - d)
    for be, bm in zip(ema.buffers(), module.buffers()):
        be.copy_(bm)


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(base, step, total, schedule):
    """Learning rate of ``step`` (1..total): ``constant`` or ``cosine`` decay from ``base`` to 0 at
    the last step (a short training then ends on settled weights, not on the noise of a large
    step size). A function of the step alone, so a resumed training sets the same rates."""
    if schedule == "constant":
        return float(base)
    check_choice(schedule, LR_SCHEDULES, "lr_schedule")
    return 0.5 * float(base) * (1.0 + math.cos(math.pi * (step - 1) / max(1, int(total))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class BestWeights(torch.nn.Module):
    """The weights of ``module`` at the best validation score seen so far (higher is better), with
    that score and its step as buffers: held in a training's checkpoint like any module, so the
    selection survives a kill."""

    def __init__(self, module):
        super().__init__()
        self.model = frozen_copy(module)
        self.register_buffer("score", torch.tensor(float("-inf"), dtype=torch.float64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def offer(self, step, score, module):
        """Keep ``module``'s weights when ``score`` beats the best so far; returns whether it did."""
        if not float(score) > float(self.score):
            return False
        self.model.load_state_dict(module.state_dict())
        self.score.fill_(float(score))
        self.step.fill_(int(step))
        return True


# --------------------------------------------------------------------------- perceptual loss


def build_perceptual(spatial_dims, weight, weights_path, where):
    """Perceptual loss from a local ResNet-50 state dict only; ``None`` (logged) otherwise."""
    if not weight or float(weight) <= 0:
        log.info("perceptual loss off (weight 0)")
        return None
    if not weights_path:
        log.info("perceptual loss off: no local weights configured (%s.perceptual_weights_path); "
                 "pretrained weights are never downloaded", where)
        return None
    p = Path(weights_path)
    if not p.exists():
        raise InputError("perceptual weights file does not exist", file=p, field=f"{where}.perceptual_weights_path",
                         fix="point it to a local ResNet-50 state dict or set perceptual_weight: 0")
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise InputError("the perceptual loss needs torchvision, which is not installed",
                         field=f"{where}.perceptual_weight",
                         fix="install torchvision or set perceptual_weight: 0") from exc
    from monai.losses import PerceptualLoss

    loss = PerceptualLoss(spatial_dims=spatial_dims, network_type="resnet50", is_fake_3d=spatial_dims == 3,
                          pretrained=True, pretrained_path=str(p))
    log.info("perceptual loss on: resnet50 weights %s", p)
    return loss


# --------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Atomic ``last`` checkpoint of a training run.

    ``modules``/``optimizers``/``scalers`` are dicts name -> object; ``extra`` a
    dict of plain values (:func:`plain_data`) restored verbatim (e.g. a latent scale factor).
    """

    def __init__(self, directory, name, every, fingerprint):
        self.dir = Path(directory)
        self.name = name
        self.every = max(1, int(every))
        self.fingerprint = fingerprint
        self.path = self.dir / f"{name}_last.pt"

    def save(self, step, modules, optimizers, scalers, history, extra=None):
        payload = {
            "step": int(step),
            "fingerprint": self.fingerprint,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "scalers": {k: s.state_dict() for k, s in scalers.items()},
            "history": list(history),
            "rng": rng_state(),
            "extra": dict(extra or {}),
        }
        torch_save(payload, self.path)
        log.info("checkpoint: step %d -> %s", step, self.path)

    def load(self, modules, optimizers, scalers, device="cpu", max_step=None):
        """Restore in place; returns ``(step, history, extra)`` or ``(0, [], {})``.

        A checkpoint beyond ``max_step`` (the total was lowered) is ignored.
        """
        if not self.path.exists():
            return 0, [], {}
        try:
            payload = torch_load(self.path, map_location=device, what="checkpoint")
        except InputError as exc:  # a corrupt or refused checkpoint must not block a rerun
            log.warning("%s; starting from step 0", exc)
            return 0, [], {}
        if payload.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s was written with another configuration/inputs; starting from step 0",
                        self.path)
            return 0, [], {}
        if max_step is not None and int(payload["step"]) > int(max_step):
            log.warning("checkpoint %s is at step %d, beyond the requested %d steps; starting from step 0",
                        self.path, payload["step"], max_step)
            return 0, [], {}
        for k, m in modules.items():
            m.load_state_dict(payload["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(payload["optimizers"][k])
        for k, s in scalers.items():
            s.load_state_dict(payload["scalers"][k])
        set_rng_state(payload["rng"])
        log.info("resuming %s from checkpoint step %d (%s)", self.name, payload["step"], self.path)
        return int(payload["step"]), list(payload["history"]), dict(payload.get("extra", {}))


class StopTraining(Exception):
    """Raised internally when ``max_steps_this_run`` is reached."""


class ProgressLogger:
    def __init__(self, name, total, every):
        self.name = name
        self.total = int(total)
        self.every = max(1, int(every))
        self.t0 = time.perf_counter()
        self.n = 0

    def step(self, step, losses):
        self.n += 1
        if step % self.every == 0 or step == self.total or self.n == 1:
            dt = time.perf_counter() - self.t0
            rate = self.n / dt if dt > 0 else float("nan")
            txt = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            log.info("%s step %d/%d %s (%.2f it/s)", self.name, step, self.total, txt, rate)


def train_loop(*, name, total_steps, step_fn, modules, optimizers, scalers, out_dir, fingerprint,
               checkpoint_every=50, log_every=10, max_steps_this_run=None, callback=None,
               extra=None, device="cpu"):
    """Run ``step_fn(step) -> dict(loss name -> float)`` for steps 1..total with resume.

    Returns ``(history, completed, extra)``: the loss history (list of dicts with
    ``step``), whether ``total_steps`` was reached and the (possibly restored)
    ``extra`` dict.
    """
    out_dir = Path(out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", name, checkpoint_every, fingerprint)
    start, history, saved_extra = ckpt.load(modules, optimizers, scalers, device=device, max_step=total_steps)
    extra = dict(extra or {})
    extra.update(saved_extra)
    history = [h for h in history if h["step"] <= start]
    prog = ProgressLogger(name, total_steps, log_every)
    if start >= total_steps:
        log.info("%s: checkpoint already at step %d/%d, nothing to train", name, start, total_steps)
        return history, True, extra
    log.info("%s: training steps %d..%d", name, start + 1, total_steps)
    done_this_run = 0
    step = start
    for step in range(start + 1, total_steps + 1):
        losses = step_fn(step)
        losses = {k: float(v) for k, v in losses.items()}
        history.append({"step": step, **losses})
        prog.step(step, losses)
        done_this_run += 1
        if step % ckpt.every == 0 or step == total_steps:
            ckpt.save(step, modules, optimizers, scalers, history, extra)
        if callback is not None:
            callback(step)
        if max_steps_this_run is not None and done_this_run >= max_steps_this_run and step < total_steps:
            if step % ckpt.every != 0:
                ckpt.save(step, modules, optimizers, scalers, history, extra)
            log.info("%s: stopping after %d steps this run (step %d/%d)", name, done_this_run, step,
                     total_steps)
            return history, False, extra
    return history, True, extra


def finish_training(name, out_dir, payload, config_record, history, title):
    """Write a finished model's outputs: ``<name>.pt`` (``payload``), ``<name>_config.json``
    (``config_record``) and the loss curves ``<name>_losses.{tsv,png}``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"model": torch_save(payload, out_dir / f"{name}.pt"),
             "config": save_config(config_record, out_dir / f"{name}_config.json")}
    paths["losses_tsv"], paths["losses_png"] = write_loss_curves(
        history, out_dir / f"{name}_losses.tsv", out_dir / f"{name}_losses.png", title)
    paths["completed"] = True
    paths["history"] = history
    return paths


# --------------------------------------------------------------------------- loss curves


def write_loss_curves(history, tsv_path, png_path, title=""):
    """Loss history (list of dicts with ``step``) -> TSV + PNG (one panel per loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    if df.empty:
        df = pd.DataFrame({"step": []})
    save_table(df, tsv_path)
    # terms that are switched off (all zero) stay in the TSV but get no panel
    cols = [c for c in df.columns if c != "step" and df[c].astype(float).abs().sum() > 0]
    n = max(1, len(cols))
    ncol = min(n, 4)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.4 * nrow), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, c in zip(axes.ravel(), cols):
        y = df[c].to_numpy(dtype=float)
        ax.plot(df["step"], y, lw=0.6, alpha=0.5)
        if len(y) >= 5:
            w = max(1, len(y) // 20)
            ax.plot(df["step"], pd.Series(y).rolling(w, min_periods=1).mean(), lw=1.2)
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title} (x: step)", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.86, wspace=0.35, hspace=0.45)
    save_figure(fig, png_path, dpi=80)
    return Path(tsv_path), Path(png_path)


# --------------------------------------------------------------------------- data


def load_prob_label(path, n_classes=None, tol=1e-2):
    """4-D probabilistic label map -> ``(K, X, Y, Z)`` float32, validated."""
    path = Path(path)
    if not path.exists():
        raise InputError("probabilistic label map not found", file=path, fix="run preprocessing first")
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    if arr.ndim != 4:
        raise InputError(f"expected a 4-D (X,Y,Z,K) probabilistic map, got shape {arr.shape}", file=path,
                         fix="use the *_labelprob.nii.gz output of preprocessing")
    if n_classes is not None and arr.shape[-1] != n_classes:
        raise InputError(f"map has {arr.shape[-1]} channels but the label schema has {n_classes} classes",
                         file=path, fix="regenerate the maps with the current labels.classes")
    s = arr.sum(-1)
    if np.abs(s - 1).max() > tol:
        raise InputError(f"channels do not sum to 1 (max deviation {np.abs(s - 1).max():.3g})", file=path,
                         fix="renormalise the probabilistic map")
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def load_image(path):
    """3-D image -> ``(X, Y, Z)`` float32."""
    path = Path(path)
    if not path.exists():
        raise InputError("image not found", file=path, fix="run preprocessing first")
    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"expected a 3-D image, got shape {arr.shape}", file=path)
    return arr


def load_label_stack(label_paths, n_classes=None):
    """All maps -> ``(N, K, X, Y, Z)``; all must share one grid."""
    if not label_paths:
        raise InputError("no probabilistic label maps given", fix="check the training subject list")
    vols = [load_prob_label(p, n_classes) for p in label_paths]
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise InputError(f"label maps are on different grids: {sorted(shapes)}",
                         fix="resample all subjects to the working grid")
    return np.stack(vols)


class Cohort:
    """Training subjects in memory: probabilistic maps and (optionally) images on one grid.

    ``labels``: ``(N, K, X, Y, Z)``; ``images``: ``(N, M, X, Y, Z)`` (``M`` = len(modalities))
    or ``None``; ``brain[i]``: axial indices with >= ``min_brain_voxels`` brain voxels.
    ``dtype`` float16 halves the memory of large cohorts (paper grid: ~47 MB/subject in float32).
    2-D mode: :meth:`label_slices` stacks every brain slice ``(S, K, X, Y)``.
    """

    def __init__(self, label_paths, image_paths=None, n_classes=None, min_brain_voxels=1, dtype=np.float32):
        self.label_paths = [str(p) for p in label_paths]
        labels = load_label_stack(self.label_paths, n_classes)
        self.shape = tuple(labels.shape[2:])
        self.modalities = list(image_paths or {})
        self.images = None
        if image_paths:
            imgs = np.zeros((labels.shape[0], len(self.modalities)) + self.shape, dtype=dtype)
            for j, m in enumerate(self.modalities):
                paths = list(image_paths[m])
                if len(paths) != len(self.label_paths):
                    raise InputError(f"{len(paths)} {m} images for {len(self.label_paths)} label maps",
                                     field=f"image_paths.{m}",
                                     fix="give one image per subject and modality, in the label order")
                for i, p in enumerate(paths):
                    a = load_image(p)
                    if a.shape != self.shape:
                        raise InputError(f"image grid {a.shape} differs from the label grid {self.shape}",
                                         file=p, fix="resample to the working grid")
                    imgs[i, j] = a
            self.images = imgs
        self.brain = []
        for i, v in enumerate(labels):
            zs = brain_slices(v, min_brain_voxels=min_brain_voxels)
            if len(zs) == 0:
                raise InputError("no axial slice with brain", file=self.label_paths[i])
            self.brain.append(zs)
        self.labels = labels.astype(dtype, copy=False)

    def __len__(self):
        return len(self.label_paths)

    def label_slices(self):
        """``(S, K, X, Y)`` brain slices and their ``(subject index, z)``."""
        sl, idx = [], []
        for i, zs in enumerate(self.brain):
            for z in zs:
                sl.append(self.labels[i, ..., z])
                idx.append((i, int(z)))
        return np.stack(sl), idx


# A class below this share of the training voxels (lesions, small structures) is "rare":
# random patches or slices seldom hold it, so a plain loss lets a generator drop it.
RARE_CLASS_FREQUENCY = 0.01


def rare_classes(frequency):
    """Indices of the classes present in training below :data:`RARE_CLASS_FREQUENCY`."""
    return [c for c in range(len(frequency)) if 0 < float(frequency[c]) < RARE_CLASS_FREQUENCY]


def brain_slices(prob_volume, background_channel=0, min_brain_voxels=1):
    """Indices ``z`` of axial slices of a ``(K, X, Y, Z)`` map that contain brain."""
    brain = (1.0 - prob_volume[background_channel]) > 0.5
    counts = brain.reshape(-1, brain.shape[-1]).sum(0)
    return np.flatnonzero(counts >= min_brain_voxels)


def axial_slices(volume):
    """``(C, X, Y, Z)`` -> ``(Z, C, X, Y)``."""
    return np.ascontiguousarray(np.moveaxis(volume, -1, 0))


def divisible_shape(shape, k):
    return tuple(int(np.ceil(s / k) * k) for s in shape)


def pad_to(x, shape, value=0.0):
    """Centre-pad the trailing spatial dims of tensor ``x`` to ``shape``."""
    spatial = x.shape[-len(shape):]
    pads = []
    for s, t in zip(reversed(spatial), reversed(tuple(shape))):
        d = t - s
        if d < 0:
            raise ValueError(f"cannot pad {tuple(spatial)} to smaller {tuple(shape)}")
        pads += [d // 2, d - d // 2]
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def crop_to(x, shape):
    """Centre-crop the trailing spatial dims of ``x`` to ``shape`` (inverse of :func:`pad_to`)."""
    spatial = x.shape[-len(shape):]
    sl = [slice(None)] * (x.ndim - len(shape))
    for s, t in zip(spatial, shape):
        d = s - t
        sl.append(slice(d // 2, d // 2 + t))
    return x[tuple(sl)]


def pad_background(x, shape):
    """Pad a probabilistic map ``(B, K, ...)`` with background (channel 0 = 1)."""
    y = pad_to(x, shape, value=0.0)
    if tuple(y.shape[-len(shape):]) == tuple(x.shape[-len(shape):]):
        return y
    mask = pad_to(torch.ones_like(x[:, :1]), shape, value=0.0)
    y[:, :1] = y[:, :1] + (1.0 - mask)
    return y


def save_config(cfg, path):
    return save_json(cfg, path)
