"""Parameter counts of the authors' DMZ models (exlab-research/dmz), built with diffusers 0.32.0.

Needs torch and diffusers 0.32.0 (see tools/make_diffusers_fixtures.py for the venv):

    /work/venvs/torch/bin/python tools/count_authors_params.py \
        [--out tools/authors_param_counts.json]

Each recipe of the authors' README is built as their ddpm_train.py create_model and
dmz/models.py DiffDecoder build it: channel_mult and attention levels by image size, up blocks
mirroring the down blocks, CrossAttn{Down,Up}Block2D at the cross-attention levels (all of them
with --cross_attention, level k only with --one_cross_attention k, Attn{Down,Up}Block2D at the
other attention levels), mid block UNetMidBlock2DCrossAttn (every recipe uses
cross-attention), cross_attention_dim = 2L (z_via_cross_att), out_channels = 2C with
learn_sigma, the HF legacy options for CelebA-HQ. The encoder is the BernoulliEncoder body
(Conv-BN-LeakyReLU per width, then Linear(4 C_last, 2L)), written anew here. Models are
built on the "meta" device: shapes only, no memory, no initialisation.

"fashion_mnist" is not one of the authors' recipes: configs/authors/fashion_mnist.py, their
CIFAR-10 layout shrunk to the offline default's CPU budget (32 px, 1 input and 2 output
channels, 8 x (1, 2, 2), one resnet per block, [Down, CrossAttn, CrossAttn], 8 GroupNorm
groups, L = 64, the 32 px encoder). The head count does not change the number of parameters.

Also listed: google/ddpm-ema-celebahq-256, the UNet2DModel the HQ recipe fine-tunes.
Columns: unet, of which cross-attention (every transformer block's norm2 + attn2: what
dmz_jax's parameter_groups counts as conditioning), encoder, total.
"""

import argparse
import json
import os

import torch
from torch import nn

import diffusers
from diffusers import UNet2DConditionModel, UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HQ_LEGACY = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)

# name: image_size, num_channels, layers_per_block, attention_head_dim, latent_dim,
# in_channels, learn_sigma, one_cross_attention, resnet_time_scale_shift, legacy
RECIPES = {
    "cifar10": (32, 128, 3, 32, 16, 3, True, -1, "scale_shift", False),
    "celeba64": (64, 192, 3, 64, 64, 3, True, -1, "scale_shift", False),
    "edges64": (64, 192, 3, 64, 256, 1, True, 2, "scale_shift", False),
    "handbags64": (64, 192, 3, 64, 256, 3, True, 2, "scale_shift", False),
    "celebahq256": (256, 128, 2, 512, 256, 3, False, -1, "default", True),
    "fashion_mnist": (32, 8, 1, 4, 64, 1, True, -1, "scale_shift", False),
}
# configs/authors/fashion_mnist.py's departures from the 32 px layout below
OVERRIDES = {"fashion_mnist": dict(block_out_channels=[8, 16, 16], norm_num_groups=8,
                                   down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                                   up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"])}

LAYOUTS = {  # image size: channel_mult, is_attention, encoder widths (ddpm_train.py)
    32: ((1, 2, 2, 2), (False, True, True, False), [32, 64, 128, 256]),
    64: ((1, 2, 3, 4), (False, True, True, True), [32, 64, 128, 256, 512]),
    256: ((1, 1, 2, 2, 4, 4), (False, False, False, False, True, False),
          [32, 64, 128, 256, 512, 1024, 2048]),
}


def encoder(in_channels, widths, latent_dim, image_size):
    blocks, c = [], in_channels
    for w in widths:
        blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(w), nn.LeakyReLU()))
        c = w
    size = image_size // 2 ** len(widths)
    return nn.Sequential(nn.Sequential(*blocks), nn.Flatten(),
                         nn.Linear(c * size * size, 2 * latent_dim))


def unet_kwargs(image_size, channels, layers, heads, latent_dim, in_ch, learn_sigma,
                one_cross, shift, legacy):
    mult, is_attn, _ = LAYOUTS[image_size]
    n = len(mult)
    if one_cross >= 0:
        assert is_attn[one_cross]
        is_cross = tuple(i == one_cross for i in range(n))
    else:
        is_cross = is_attn  # --cross_attention True
    down, up = [None] * n, [None] * n
    for i, (ca, a) in enumerate(zip(is_cross, is_attn)):
        kind = "CrossAttn" if ca else ("Attn" if a else "")
        down[i], up[n - 1 - i] = f"{kind}DownBlock2D", f"{kind}UpBlock2D"
    kw = dict(sample_size=image_size, in_channels=in_ch,
              out_channels=2 * in_ch if learn_sigma else in_ch, layers_per_block=layers,
              block_out_channels=[channels * m for m in mult], down_block_types=down,
              up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
              attention_head_dim=heads, resnet_time_scale_shift=shift,
              cross_attention_dim=2 * latent_dim)
    if legacy:
        kw.update(HQ_LEGACY)
    return kw


def count(module):
    return sum(p.numel() for p in module.parameters())


def cross_attention_count(unet):
    return sum(p.numel() for name, p in unet.named_parameters()
               if ".attn2." in name or (".norm2." in name and "transformer_blocks" in name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "authors_param_counts.json"))
    args = parser.parse_args()
    assert diffusers.__version__ == "0.32.0", diffusers.__version__
    results = {}
    with torch.device("meta"):
        for name, recipe in RECIPES.items():
            image_size, latent_dim, in_ch = recipe[0], recipe[4], recipe[5]
            kw = {**unet_kwargs(*recipe), **OVERRIDES.get(name, {})}
            unet = UNet2DConditionModel(**kw)
            enc = encoder(in_ch, LAYOUTS[image_size][2], latent_dim, image_size)
            results[name] = {"unet": count(unet), "cross_attn": cross_attention_count(unet),
                             "encoder": count(enc), "total": count(unet) + count(enc),
                             "unet_kwargs": kw, "encoder_widths": LAYOUTS[image_size][2]}
        hf = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=[128, 128, 256, 256, 512, 512],
                  down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
                  attention_head_dim=None, **HQ_LEGACY)
        unet = UNet2DModel(**hf)
        results["google/ddpm-ema-celebahq-256 (UNet2DModel)"] = {
            "unet": count(unet), "cross_attn": 0, "encoder": 0, "total": count(unet),
            "unet_kwargs": hf}
    print(f"{'model':44s} {'unet':>12s} {'cross-attn':>11s} {'encoder':>11s} {'total':>12s}")
    for name, r in results.items():
        print(f"{name:44s} {r['unet']:12,d} {r['cross_attn']:11,d} {r['encoder']:11,d} "
              f"{r['total']:12,d}")
    with open(args.out, "w") as f:
        json.dump({"diffusers": diffusers.__version__, "models": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
