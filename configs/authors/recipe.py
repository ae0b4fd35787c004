"""The authors' DMZ recipe (exlab-research/dmz, README "Training"), shared by configs/authors/.

`authors_dmz(c, ...)` turns a base config into the network and training recipe of one of the
authors' README commands. Every config in this folder calls it and then lists, in its own
docstring, the command it mirrors and every deviation.

Common to all their commands (`--encoder_type bernoulli --z_via_cross_att True
--cross_attention True --schedule_sampler loss-second-moment --lr 1e-4 --batch_size 128
--diffusion_steps 1000 --use_fp16 True`):
  - model.backbone=diffusers_unet: diffusers' UNet2DConditionModel; attention levels are
    CrossAttn blocks (Transformer2D: self-attention, cross-attention to z, GEGLU), the mid
    block cross-attends; `--attention_head_dim` is diffusers' head count;
  - model.encoder.type=conv_bn: Conv 3x3 stride 2 -> BatchNorm -> LeakyReLU per width
    (32, 64, ... down to 2x2), flatten, Linear to 2|z| logits;
  - model.binary_estimator=gumbel_softmax, temperature 1: a soft relaxed sample in training, a
    random hard draw at evaluation (model.gumbel_eval=sample);
  - model.z_tokens=one_hot_single: ONE cross-attention token, the 2|z| vector of (off, on);
  - input perturbation (DDPM-IP) gamma, the loss-second-moment timestep sampler, the hybrid
    loss with learned variances (rescaled: vb x T / 1000), cosine betas, T = 1000;
  - AdamW lr 1e-4, no weight decay, no gradient clipping, EMA 0.9999 from the first step (no
    warm-up), batch 128, random horizontal flips;
  - eval.protocol=authors: 10,000 samples per FID at K = 100 against the training set, the
    probe on soft codes with 5-fold CV over train and test together, NLL with soft z.
Deviations chosen on purpose, in every config:
  - gradients are averaged over every device (the authors' multi-GPU runs bypass DDP, so each
    rank trained its own replica on its shard and rank 0 was saved);
  - bfloat16 compute with float32 master weights (model.dtype) instead of fp16 with loss
    scaling; BatchNorm statistics are over the global batch (theirs: per GPU);
  - their evident bugs are not reproduced: the per-bit "empirical" prior's indexing and the
    NLL on the first 1,000 sorted CIFAR-10 files (all one class).
"""

from typing import Sequence

import ml_collections

from dmz_jax.config_base import tiny


def authors_dmz(c: ml_collections.ConfigDict, *, num_channels: int, channel_mult: Sequence[int],
                layers_per_block: int, attention_head_dim: int, dropout: float, latent_dim: int,
                input_perturbation: float, attention_resolutions: Sequence[int]) -> None:
    """Sets `c` (in place) to the authors' recipe with the given README arguments.

    attention_resolutions: the pixels of the levels the authors' `is_attention` marks (32px:
    16 and 8; 64px: 32, 16 and 8; 256px: 16); all cross-attend unless the caller narrows
    model.cross_attention_resolutions (`--one_cross_attention`).
    """
    m = c.model
    m.update(backbone="diffusers_unet", latent_type="binary", latent_dim=latent_dim,
             conditioning="cross_attention", z_tokens="one_hot_single",
             binary_estimator="gumbel_softmax", gumbel_temperature=1.0, gumbel_eval="sample",
             model_channels=num_channels, channel_mult=tuple(channel_mult),
             num_res_blocks=layers_per_block, attention_resolutions=tuple(attention_resolutions),
             dropout=dropout, learn_sigma=True, use_scale_shift_norm=True, num_groups=32,
             dtype="bfloat16")
    m.cross_attention_resolutions = None  # every attention level
    m.diffusers.update(attention_head_dim=attention_head_dim, flip_sin_to_cos=True,
                       freq_shift=0, downsample_padding=1, norm_eps=1e-5, mid_attention=False)
    m.encoder.update(type="conv_bn", model_channels=32, center_examples=0)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, rescale_timesteps=False,
                       vlb_weight=0.001, variance="learned_range",
                       input_perturbation=input_perturbation)
    c.training.update(batch_size=128, learning_rate=1e-4, weight_decay=0.0, warmup_steps=0,
                      grad_clip=0.0, encoder_lr_scale=1.0, ema_decay=0.9999, ema_warmup=False,
                      timestep_sampler="loss_second_moment")
    c.data.random_flip = True
    c.sampling.steps = (100,)
    c.eval.update(protocol="authors", fd_steps=(100,), fd_num_samples=10_000)


def tiny_authors(c: ml_collections.ConfigDict) -> None:
    """config_base.tiny (16 channels, 2 levels, attention at half size, T = 50, 4 steps),
    keeping the authors' options: 2 heads, the Conv-BN encoder from width 8, float32."""
    tiny(c)
    c.model.dtype = "float32"
    c.model.diffusers.attention_head_dim = 2
    c.model.encoder.model_channels = 8
    c.training.batch_size = 8
    c.sampling.steps = (2, 5)
    c.eval.update(fd_steps=(2,), fd_num_samples=16)
