"""Label LDM on full-resolution latents, patchified: a lever measured outside the workflow.

A label VAE whose latent stays on the working grid (``vae.channels: [32]``) passes the
reconstruction gate that the demo's half-resolution latent misses, but the demo's LDM runs ten
times as long per step on such latents (README, "A latent at full resolution"). Here the LDM's
U-Net sees each 2x2x2 block of latent voxels as channels (as DiT and Stable Diffusion 3 patchify
their latents) and runs on the half-resolution grid; its output is put back on the full grid.
Everything else (latent normalisation, scheduler, conditioning, sampling, audit) is the
workflow's, through ``benchmarks/label_generator_levers.py``, whose arguments this script takes:

    .venv/bin/python benchmarks/label_ldm_patchified.py --results results/brainspade-demo --out /tmp/patch \\
        --sites site_a,site_t --calibration tissue \\
        --vae '{"vae": {"steps": 1500, "channels": [32], "attention_levels": [false], ...}}' \\
        --ldm '{"ldm": {"steps": 4000, ...}}' --guidance 3 --inference-steps 25 --per-mode 50

The wrapper replaces ``label_generator.build_unet`` for this process only (models written here
load only through this script).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PATCH = 2


def unshuffle(x, p=PATCH):
    """``(B, C, D, H, W)`` -> ``(B, C * p^3, D / p, H / p, W / p)``: each p^3 block into channels."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p ** 3, d // p, h // p, w // p)


def shuffle(x, p=PATCH):
    """The inverse of :func:`unshuffle`."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // p ** 3, p, p, p, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // p ** 3, d * p, h * p, w * p)


class Patchified(torch.nn.Module):
    """The workflow's diffusion U-Net (built from the same keyword arguments, with p^3 times the
    input and output channels) between :func:`unshuffle` and :func:`shuffle`."""

    def __init__(self, kwargs, build):
        super().__init__()
        k = dict(kwargs)
        k["in_channels"] = k["in_channels"] * PATCH ** 3
        k["out_channels"] = k["out_channels"] * PATCH ** 3
        self.inner = build(k)

    def forward(self, x, timesteps, context=None, **kwargs):
        return shuffle(self.inner(unshuffle(x), timesteps=timesteps, context=context, **kwargs))


def main(argv=None):
    from brainsynth.generators.brainspade import label_generator as LG

    import label_generator_levers

    build = LG.build_unet
    LG.build_unet = lambda kwargs: Patchified(kwargs, build)
    label_generator_levers.main(argv)


if __name__ == "__main__":
    main()
