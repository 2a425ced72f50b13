"""The label LDM's U-Net on blocks of latent voxels (``label_generator.ldm.patch_size``).

A label VAE whose latent stays on the working grid reconstructs the thin CSF rim that a
half-resolution latent loses, but the diffusion U-Net on such latents costs about ten times as
much per step on a CPU (README, "A latent at full resolution"). With ``patch_size`` p the U-Net
sees each p^d block of latent voxels as channels (as DiT and Stable Diffusion 3 patchify their
latents), runs on a grid p times coarser per axis, and its output is put back on the latent grid.
"""

import torch


def unshuffle(x, p):
    """``(B, C, *S)`` -> ``(B, C * p^d, *S / p)``: each p^d block of voxels into channels."""
    b, c, *s = x.shape
    d = len(s)
    split = [b, c]
    for n in s:
        split += [n // p, p]
    x = x.reshape(split)
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.permute(order).reshape([b, c * p ** d] + [n // p for n in s])


def shuffle(x, p):
    """The inverse of :func:`unshuffle`."""
    b, c, *s = x.shape
    d = len(s)
    x = x.reshape([b, c // p ** d] + [p] * d + list(s))
    order = [0, 1]
    for i in range(d):
        order += [2 + d + i, 2 + i]
    return x.permute(order).reshape([b, c // p ** d] + [n * p for n in s])


class PatchedUNet(torch.nn.Module):
    """A diffusion U-Net with p^d times the latent's input and output channels between
    :func:`unshuffle` and :func:`shuffle`; called like the U-Net itself."""

    def __init__(self, unet, patch_size):
        super().__init__()
        self.unet = unet
        self.patch_size = int(patch_size)

    def forward(self, x, timesteps, context=None, **kwargs):
        p = self.patch_size
        return shuffle(self.unet(unshuffle(x, p), timesteps=timesteps, context=context, **kwargs), p)
