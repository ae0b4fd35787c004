"""The authors' DMZ on CelebA-HQ 256 (their README, "Finetuning CelebA-HQ DDPM from HuggingFace"):

    mpiexec -n 2 python ddpm_train.py --data_dir data/celebahq/celebahq256_train --input_pertub 0.1
        --image_size 256 --use_fp16 True --num_channels 128 --attention_head_dim 512
        --layers_per_block 2 --variance_type fixed_small --dropout 0.1 --diffusion_steps 1000
        --noise_schedule linear --rescale_learned_sigmas True --schedule_sampler loss-second-moment
        --lr 1e-4 --batch_size 128 --encoder_type bernoulli --latent_dim 256
        --z_via_cross_att True --cross_attention True --finetune_path PRETRAINED_MODEL
        --resnet_time_scale_shift default --hugging_face_checkpoints_params True

    python -m dmz_jax.main --config=configs/authors/celebahq256.py --workdir=runs/authors_hq \
        --config.training.init_from=runs/ddpm_celebahq_converted --config.data.image_dir=PATH

U-Net 128 x (1, 1, 2, 2, 4, 4), 2 resnets per block, blocks [Down x 4, CrossAttn, Down] with
512 heads of width 1 at 16x16 and in the mid block; diffusers' legacy options of the HF DDPM
checkpoints (downsample_padding 0, flip_sin_to_cos False, freq_shift 1, norm_eps 1e-6),
resnets without scale-shift; linear betas, fixed_small variances, MSE loss only; |z| = 256
(one 512-wide token); encoder widths 32..2048.
Fine-tuning start: diffusers' UNet2DModel checkpoint google/ddpm-ema-celebahq-256, converted
to a workdir by dmz_jax/convert (README "The authors' DMZ"), then training.init_from; the
layers it does not have (cross-attention, the z pathway) start fresh, as the authors'
`load_state_dict(strict=False)`.
Data: a folder of the 30,000 CelebA-HQ images (data.name=image_folder); 10% held out here,
the authors split by CelebA index (24,183 / 5,817).
Deviations: those in configs/authors/recipe.py; the split; 40,000 steps (the paper's
fine-tuning length; their code never stops); batch 64 and the memory knobs (bf16, remat,
dot_product_attention), as configs/celebahq256.py.
Variant "tiny": the same options at tiny widths (tests).
"""

from typing import Optional

from configs.authors.recipe import authors_dmz, tiny_authors
from dmz_jax.config_base import base_config


def get_config(arg: Optional[str] = None):
    c = base_config()
    c.data.update(name="image_folder", image_dir="data/celeba_hq_256", image_size=256,
                  channels=3, test_fraction=0.1)
    authors_dmz(c, num_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), layers_per_block=2,
                attention_head_dim=512, dropout=0.1, latent_dim=256, input_perturbation=0.1,
                attention_resolutions=(16,))
    c.model.update(learn_sigma=False, use_scale_shift_norm=False, remat=True,
                   attention_impl="dot_product_attention")
    c.model.diffusers.update(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                             norm_eps=1e-6)
    c.diffusion.update(schedule="linear", variance="fixed_small")
    c.training.update(batch_size=64, num_steps=40_000, checkpoint_every=2_000,
                      sample_every=5_000)
    c.sampling.update(batch_size=16, num_samples=16)
    c.eval.encode_batch_size = 64
    if arg == "tiny":
        tiny_authors(c)
        c.model.diffusers.attention_head_dim = 16  # head width 1 at 16 channels, as theirs
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/authors/celebahq256.py; "
                         "use 'tiny'.")
    return c
