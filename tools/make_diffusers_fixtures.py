"""Writes tests/fixtures/diffusers/*.npz: tiny diffusers 0.32.0 U-Nets (and the authors' Conv-BN
encoder) with random weights, their inputs and their outputs, for tests/test_diffusers_unet.py.

Needs torch and diffusers 0.32.0, which dmz_jax does not depend on: use a separate venv, e.g.

    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 diffusers==0.32.0 numpy \
        safetensors huggingface_hub
    /work/venvs/torch/bin/python tools/make_diffusers_fixtures.py [--out tests/fixtures/diffusers]

(PyPI's Linux torch is a CUDA build of several GB; a CPU wheel, e.g. torch==2.13.0+cpu, is
enough.) The outputs are deterministic given the seed, up to PyTorch's CPU kernels.

Each layout mirrors one of the authors' recipes (exlab-research/dmz ddpm_train.py create_model)
at a tiny width; each file holds
  sd_values, sd_index   the state dict (PyTorch layout, float32) packed into one vector;
                  sd_index is UTF-8 JSON [[name, shape, offset], ...] (num_batches_tracked
                  stored as float)
  x, t            the input image (NHWC, float32) and timesteps
  ehs             encoder_hidden_states [B, S, cross_attention_dim] (absent for UNet2DModel)
  class_labels    the z_with_t input (only where class_embed_type="simple_projection")
  out             the model output, NHWC float32, eval mode
  config          UTF-8 JSON: "ours" (DiffusersUNet keyword arguments), "diffusers" (the model's
                  constructor arguments), "class" (UNet2DConditionModel / UNet2DModel)
The DiffDecoder fixture adds the encoder: its names are encoder.* and unet.*, enc_x (NHWC),
enc_out (the 2L Linear output in eval mode), enc_train_out and train_stats/<bn name> (one
train-mode forward: the batch-statistics output and the updated running statistics), and
config "encoder" (ConvBNEncoder keyword arguments).

Every parameter and BatchNorm buffer is perturbed (norm scales around 1, biases and running
statistics random), so that a wrong layout or a swapped scale/shift cannot pass.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np
import torch
from torch import nn

import diffusers
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2

HQ_LEGACY = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)


def _layouts():
    """name -> (diffusers class, diffusers kwargs, our kwargs, image size, in channels,
    tokens S, timesteps, extras)."""
    w4 = (4, 8, 12, 16)  # channel_mult (1, 2, 3, 4) at 4 channels
    return {
        # CIFAR-10: [D, X, X, D], cross mid, scale_shift; plus z_with_t added to the time
        # embedding (class_embed_type="simple_projection").
        "cifar_like": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                            "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(4, 8, 8, 8),
            layers_per_block=1, attention_head_dim=4, norm_num_groups=4, dropout=0.3,
            resnet_time_scale_shift="scale_shift", cross_attention_dim=8, in_channels=3,
            out_channels=6, class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=8),
            dict(block_out_channels=[4, 8, 8, 8], layers_per_block=1, out_channels=6,
                 attention_levels=[1, 2], cross_attention_levels=[1, 2],
                 mid_block="cross_attention", attention_head_dim=4, cross_attention_dim=8,
                 norm_num_groups=4, dropout=0.3, resnet_time_scale_shift="scale_shift",
                 class_embed="add", class_embed_input_dim=8),
            8, 3, 1, [7, 913], {}),
        # CelebA-64: [D, X, X, X], two tokens (so that the softmax over
        # keys matters), z_with_t concatenated (class_embeddings_concat=True), float timesteps.
        "celeba_like": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
            up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=w4,
            layers_per_block=1, attention_head_dim=4, norm_num_groups=4, dropout=0.1,
            resnet_time_scale_shift="scale_shift", cross_attention_dim=6, in_channels=3,
            out_channels=6, class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=6, class_embeddings_concat=True),
            dict(block_out_channels=list(w4), layers_per_block=1, out_channels=6,
                 attention_levels=[1, 2, 3], cross_attention_levels=[1, 2, 3],
                 mid_block="cross_attention", attention_head_dim=4, cross_attention_dim=6,
                 norm_num_groups=4, dropout=0.1, resnet_time_scale_shift="scale_shift",
                 class_embed="concat", class_embed_input_dim=6),
            8, 3, 2, [0.5, 640.25], {}),
        # Edges2Handbags-64 (--one_cross_attention 2): [D, A, X, A], 1 channel in, 2 out;
        # attention_head_dim 8 = the head count of X and the mid block, the head dim of A.
        "e2h_like": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D",
                              "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D",
                            "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=w4,
            layers_per_block=1, attention_head_dim=4, norm_num_groups=4, dropout=0.1,
            resnet_time_scale_shift="scale_shift", cross_attention_dim=8, in_channels=1,
            out_channels=2),
            dict(block_out_channels=list(w4), layers_per_block=1, out_channels=2,
                 attention_levels=[1, 2, 3], cross_attention_levels=[2],
                 mid_block="cross_attention", attention_head_dim=4, cross_attention_dim=8,
                 norm_num_groups=4, dropout=0.1, resnet_time_scale_shift="scale_shift"),
            8, 1, 1, [1, 999], {}),
        # CelebA-HQ-256 with the HF legacy options: [D, D, X, D], cross mid, "default" time
        # conditioning, heads = channels (the recipe's 512 heads of dim 1).
        "hq_like": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(4, 4, 8, 8),
            layers_per_block=2, attention_head_dim=8, norm_num_groups=4, dropout=0.1,
            resnet_time_scale_shift="default", cross_attention_dim=8, in_channels=3,
            out_channels=3, **HQ_LEGACY),
            dict(block_out_channels=[4, 4, 8, 8], layers_per_block=2, out_channels=3,
                 attention_levels=[2], cross_attention_levels=[2],
                 mid_block="cross_attention", attention_head_dim=8, cross_attention_dim=8,
                 norm_num_groups=4, dropout=0.1, resnet_time_scale_shift="default",
                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
            8, 3, 1, [15, 720], {}),
        # The HF DDPM checkpoint the HQ recipe fine-tunes (google/ddpm-ema-celebahq-256): a
        # UNet2DModel with AttnDown/AttnUp at the attention level, an attention mid block and
        # attention_head_dim None (one head), same widths as hq_like (so it also serves the
        # strict=False load into hq_like's layout).
        "hq_unet2d": (UNet2DModel, dict(
            down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            block_out_channels=(4, 4, 8, 8), layers_per_block=2, attention_head_dim=None,
            norm_num_groups=4, in_channels=3, out_channels=3, **HQ_LEGACY),
            dict(block_out_channels=[4, 4, 8, 8], layers_per_block=2, out_channels=3,
                 attention_levels=[2], cross_attention_levels=[], mid_block="attention",
                 attention_head_dim=None, norm_num_groups=4, resnet_time_scale_shift="default",
                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
            8, 3, 0, [15, 720], {}),
        # The authors' HQ model built without cross-attention: UNet2DConditionModel whose
        # UNetMidBlock2D is replaced by one with attention (models.py adjust_mid_block), with
        # scale_shift (so that the mid attention has no GroupNorm); and an AttnDown level.
        "uncond_attention_mid": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2D", block_out_channels=(4, 8, 8),
            layers_per_block=1, attention_head_dim=4, norm_num_groups=4, dropout=0.1,
            resnet_time_scale_shift="scale_shift", cross_attention_dim=1, in_channels=3,
            out_channels=3, norm_eps=1e-6),
            dict(block_out_channels=[4, 8, 8], layers_per_block=1, out_channels=3,
                 attention_levels=[1], cross_attention_levels=[], mid_block="attention",
                 attention_head_dim=4, cross_attention_dim=1, norm_num_groups=4, dropout=0.1,
                 resnet_time_scale_shift="scale_shift", norm_eps=1e-6),
            8, 3, 1, [3, 500], {"replace_mid": True}),
        # The DiffDecoder: the authors' encoder (16 px: widths 4, 8, 16 down to 2x2, L = 4) and
        # a U-Net whose mid block is get_mid_block's UNetMidBlock2D (one resnet).
        "diffdecoder": (UNet2DConditionModel, dict(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2D", block_out_channels=(4, 8),
            layers_per_block=1, attention_head_dim=2, norm_num_groups=4, dropout=0.0,
            resnet_time_scale_shift="scale_shift", cross_attention_dim=8, in_channels=3,
            out_channels=6),
            dict(block_out_channels=[4, 8], layers_per_block=1, out_channels=6,
                 attention_levels=[1], cross_attention_levels=[1], mid_block="resnet",
                 attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4,
                 resnet_time_scale_shift="scale_shift"),
            16, 3, 1, [100, 4], {"encoder": dict(latent_dim=4, widths=[4, 8, 16])}),
    }


class ConvBNEncoder(nn.Module):
    """The authors' BernoulliEncoder body (dmz/models.py build_encoder + proj), written anew."""

    def __init__(self, in_channels, widths, latent_dim, image_size):
        super().__init__()
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c, w, kernel_size=3, stride=2, padding=1),
                                        nn.BatchNorm2d(w), nn.LeakyReLU()))
            c = w
        self.layers = nn.Sequential(*blocks)
        size = image_size // 2 ** len(widths)
        self.proj = nn.Linear(c * size * size, 2 * latent_dim)

    def forward(self, x):
        return self.proj(torch.flatten(self.layers(x), start_dim=1))


class DiffDecoder(nn.Module):
    def __init__(self, encoder, unet):
        super().__init__()
        self.encoder, self.unet = encoder, unet


def perturb(module, gen):
    """Every parameter and BatchNorm buffer to non-trivial random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):     # norm scales
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:                               # biases
                p.copy_(0.2 * noise)
            else:
                p.mul_(1.0 + 0.3 * noise)
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))


def nhwc(a):
    return a.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def build(name, spec, gen):
    cls, dkw, ours, size, in_ch, tokens, ts, extra = spec
    torch.manual_seed(len(name))
    model = cls(sample_size=size, **dkw)
    if extra.get("replace_mid"):
        c = dkw["block_out_channels"]
        model.mid_block = UNetMidBlock2D(
            in_channels=c[-1], temb_channels=c[0] * 4, dropout=dkw["dropout"],
            resnet_eps=dkw["norm_eps"], resnet_act_fn="silu",
            resnet_time_scale_shift=dkw["resnet_time_scale_shift"],
            attention_head_dim=dkw["attention_head_dim"],
            resnet_groups=dkw["norm_num_groups"])  # the authors': the default 32, too many here
    perturb(model, gen)
    model.eval()
    arrays = {}
    x = torch.randn(BATCH, in_ch, size, size, generator=gen)
    t = torch.tensor(ts, dtype=torch.float32 if isinstance(ts[0], float) else torch.int64)
    kwargs = {}
    if cls is UNet2DConditionModel:
        ehs = torch.rand(BATCH, tokens, dkw["cross_attention_dim"], generator=gen)
        kwargs["encoder_hidden_states"] = ehs
        arrays["ehs"] = ehs.numpy()
    if dkw.get("class_embed_type"):
        labels = torch.rand(BATCH, dkw["projection_class_embeddings_input_dim"], generator=gen)
        kwargs["class_labels"] = labels
        arrays["class_labels"] = labels.numpy()
    config = {"class": cls.__name__, "diffusers": dkw, "ours": ours, "image_size": size,
              "in_channels": in_ch, "diffusers_version": diffusers.__version__,
              "torch_version": torch.__version__}
    state_model = model
    if "encoder" in extra:
        enc_kw = extra["encoder"]
        encoder = ConvBNEncoder(in_ch, enc_kw["widths"], enc_kw["latent_dim"], size)
        perturb(encoder, gen)
        encoder.eval()
        enc_x = torch.rand(BATCH, in_ch, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            h = encoder(enc_x)
            trained = copy.deepcopy(encoder).train()
            h_train = trained(enc_x)
        arrays.update(enc_x=nhwc(enc_x), enc_out=h.numpy(), enc_train_out=h_train.numpy())
        for k, v in trained.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                arrays[f"train_stats/{k}"] = v.numpy()
        # what the authors' U-Net sees at eval: one token of the 2L pair vector (here the
        # softmax of each pair, no Gumbel noise, so that the fixture is deterministic)
        z = torch.softmax(h.reshape(BATCH, -1, 2), dim=-1).reshape(BATCH, 1, -1)
        kwargs["encoder_hidden_states"] = z
        arrays["ehs"] = z.numpy()
        config["encoder"] = enc_kw
        state_model = DiffDecoder(encoder, model)
    with torch.no_grad():
        out = model(x, t, **kwargs).sample
    arrays.update(x=nhwc(x), t=t.numpy(), out=nhwc(out))
    # the state dict as one float32 vector and a JSON index: a zip entry per tensor would
    # double the file (zip and .npy headers of ~370 small arrays)
    index, chunks, offset = [], [], 0
    for k, v in state_model.state_dict().items():
        flat = v.detach().numpy().astype(np.float32).ravel()
        index.append([k, list(v.shape), offset])
        chunks.append(flat)
        offset += flat.size
    arrays["sd_values"] = np.concatenate(chunks)
    arrays["sd_index"] = _text(json.dumps(index))
    arrays["config"] = _text(json.dumps(config))
    return arrays


def _text(s):
    return np.frombuffer(s.encode(), dtype=np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "diffusers"))
    parser.add_argument("--only", nargs="*", help="layout names (default: all)")
    args = parser.parse_args()
    assert diffusers.__version__ == "0.32.0", diffusers.__version__
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for name, spec in _layouts().items():
        if args.only and name not in args.only:
            continue
        gen = torch.Generator().manual_seed(1234 + len(name))
        arrays = build(name, spec, gen)
        path = os.path.join(args.out, f"{name}.npz")
        np.savez_compressed(path, **arrays)
        size = os.path.getsize(path)
        total += size
        n = arrays["sd_values"].size
        print(f"{name:22s} {n:8d} weights  |out| max {np.abs(arrays['out']).max():7.3f}  "
              f"{size / 1024:6.0f} KiB")
    print(f"total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
