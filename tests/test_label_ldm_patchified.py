"""benchmarks/label_ldm_patchified.py: the patchified LDM lever puts each 2x2x2 block of latent
voxels into channels and back, exactly, and runs the workflow's U-Net on the half grid."""

import importlib.util
from pathlib import Path

import torch

from brainsynth.generators.brainspade import label_generator as LG

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("label_ldm_patchified", REPO / "benchmarks" / "label_ldm_patchified.py")
patchified = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patchified)


def test_blocks_go_into_channels_and_back():
    x = torch.arange(2 * 3 * 4 * 6 * 4, dtype=torch.float32).reshape(2, 3, 4, 6, 4)
    y = patchified.unshuffle(x)
    assert y.shape == (2, 24, 2, 3, 2)
    # voxel (d, h, w) = (3, 4, 1) of channel 1: block (1, 2, 0), offset (1, 0, 1) -> channel 1 * 8 + 5
    assert y[1, 8 + 5, 1, 2, 0] == x[1, 1, 3, 4, 1]
    assert torch.equal(patchified.shuffle(y), x)


def test_the_unet_runs_on_the_half_grid():
    cfg = {"spatial_dims": 3, "ldm": {**LG.DEFAULTS["ldm"], "channels": [8, 8], "attention_levels": [False, True],
                                      "num_head_channels": 4, "norm_num_groups": 4}}
    kwargs = LG._unet_kwargs(cfg, latent_channels=2, n_types=2)
    seen = []
    net = patchified.Patchified(kwargs, LG.build_unet)
    net.inner.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    out = net(torch.randn(1, kwargs["in_channels"], 8, 8, 8), timesteps=torch.tensor([3]),
              context=torch.zeros(1, 1, kwargs["cross_attention_dim"]))
    assert out.shape == (1, 2, 8, 8, 8)
    assert seen == [(1, kwargs["in_channels"] * 8, 4, 4, 4)]
