"""The authors' DMZ recipe on the offline default (Fashion-MNIST padded to 32x32), at the CPU
budget of configs/fashion_mnist.py, so that the two designs can be set side by side:

    python -m dmz_jax.main --config=configs/authors/fashion_mnist.py --workdir=runs/authors_fm

Their CIFAR-10 command (configs/authors/cifar10.py) shrunk to the offline default's size:
diffusers' UNet2DConditionModel layout, 8 x (1, 2, 2) with 1 resnet per block, CrossAttn
blocks at 16 and 8 pixels (4 heads) and a cross-attending mid block, 8 GroupNorm groups; the
Conv-BN encoder (widths 32, 64, 128, 256); |z| = 64 Gumbel-softmax bits as one 128-wide
token; input perturbation 0.15, the loss-second-moment timestep sampler, the hybrid loss, no
gradient clipping; their evaluation protocol (eval.protocol=authors). Sized to ours: 658,506
parameters (ours 720,994) and a train step 1.2x as long as ours on 2 CPU cores
(benchmarks/authors_step_speed.py; width 16: 2.0x, width 32: 3.9x).
Deviations for the CPU budget, the same as configs/fashion_mnist.py's: 1,500 steps of batch
32, learning rate 1e-3 after 100 warm-up steps, EMA 0.999 with warm-up (decay min(0.999,
(1 + s) / (10 + s)); without it the EMA of 1,500 steps would keep 22% of the random
initialisation); no flips (configs/fashion_mnist.py
does not flip, so both designs see the same images); float32 compute on the CPU.
Variant "tiny": the same options at tiny widths (tests).
"""

from typing import Optional

from configs import fashion_mnist
from configs.authors.recipe import authors_dmz, tiny_authors


def get_config(arg: Optional[str] = None):
    c = fashion_mnist.get_config()
    authors_dmz(c, num_channels=8, channel_mult=(1, 2, 2), layers_per_block=1,
                attention_head_dim=4, dropout=0.0, latent_dim=64, input_perturbation=0.15,
                attention_resolutions=(16, 8))
    c.model.update(num_groups=8, dtype="float32")
    c.data.random_flip = False
    c.training.update(batch_size=32, num_steps=1_500, learning_rate=1e-3, warmup_steps=100,
                      ema_decay=0.999, ema_warmup=True)
    c.sampling.steps = (10, 100)
    c.eval.update(fd_steps=(10, 20, 50, 100), fd_num_samples=500)
    if arg == "tiny":
        tiny_authors(c)
        c.data.source = "bundled"
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/authors/fashion_mnist.py; "
                         "use 'tiny'.")
    return c
