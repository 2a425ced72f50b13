"""The label LDM on blocks of latent voxels (``ldm.patch_size``): blocks go into channels and back
exactly, and the U-Net runs on the coarser grid."""

import pytest
import torch

from brainsynth.errors import InputError
from brainsynth.generators.brainspade import label_generator as LG
from brainsynth.generators.brainspade.latent_patches import PatchedUNet, shuffle, unshuffle
from brainsynth.labels import LabelSchema


def test_blocks_go_into_channels_and_back_3d():
    x = torch.arange(2 * 3 * 4 * 6 * 4, dtype=torch.float32).reshape(2, 3, 4, 6, 4)
    y = unshuffle(x, 2)
    assert y.shape == (2, 24, 2, 3, 2)
    # voxel (d, h, w) = (3, 4, 1) of channel 1: block (1, 2, 0), offset (1, 0, 1) -> channel 1 * 8 + 5
    assert y[1, 8 + 5, 1, 2, 0] == x[1, 1, 3, 4, 1]
    assert torch.equal(shuffle(y, 2), x)


def test_blocks_go_into_channels_and_back_2d():
    x = torch.arange(1 * 2 * 6 * 9, dtype=torch.float32).reshape(1, 2, 6, 9)
    y = unshuffle(x, 3)
    assert y.shape == (1, 18, 2, 3)
    # pixel (4, 7) of channel 1: block (1, 2), offset (1, 1) -> channel 1 * 9 + 1 * 3 + 1
    assert y[0, 9 + 4, 1, 2] == x[0, 1, 4, 7]
    assert torch.equal(shuffle(y, 3), x)


def _cfg(patch_size):
    return {"spatial_dims": 3, "ldm": {**LG.DEFAULTS["ldm"], "channels": [8, 8], "attention_levels": [False, True],
                                       "num_head_channels": 4, "norm_num_groups": 4, "condition_channels": True,
                                       "patch_size": patch_size}}


def test_the_unet_runs_on_the_coarser_grid():
    kwargs = LG._unet_kwargs(_cfg(2), latent_channels=2, n_types=2)
    # the record keeps the latent's channels; the network is widened to the blocks
    assert kwargs["patch_size"] == 2 and kwargs["in_channels"] == 2 + 3 and kwargs["out_channels"] == 2
    assert "patch_size" not in LG._unet_kwargs(_cfg(1), latent_channels=2, n_types=2)
    net = LG.build_unet(kwargs)
    assert isinstance(net, PatchedUNet)
    seen = []
    net.unet.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    out = net(torch.randn(1, 5, 8, 8, 8), timesteps=torch.tensor([3]), context=torch.zeros(1, 1, 3))
    assert out.shape == (1, 2, 8, 8, 8)
    assert seen == [(1, 5 * 8, 4, 4, 4)]


@pytest.mark.parametrize("bad", [0, 1.5, True, "2"])
def test_patch_size_must_be_a_positive_integer(bad):
    with pytest.raises(InputError, match="ldm.patch_size") as exc:
        LG._check_ldm_settings(_cfg(bad)["ldm"], LabelSchema())
    assert exc.value.field == "label_generator.ldm.patch_size"
