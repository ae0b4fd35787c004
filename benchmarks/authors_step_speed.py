"""Train-step time of the authors' DMZ recipe against ours, in one process; prints a table.

    PYTHONPATH=. python benchmarks/authors_step_speed.py [--steps=10] [--widths=8,16,32]

Rows: configs/fashion_mnist.py (ours, the reference) and configs/authors/fashion_mnist.py at
each U-Net base width of --widths (the rest of that config unchanged), on synthetic batches
of the configs' size; the ratio column is the step time over ours, so the two can be sized
to the same CPU budget (the README's comparison).
"""

import functools
import time

import jax
import numpy as np
from absl import app, flags

from configs import fashion_mnist
from configs.authors import fashion_mnist as authors_fashion_mnist
from dmz_jax import describe, sharding
from dmz_jax import train_state as ts
from dmz_jax.model import create_model, image_shape

flags.DEFINE_integer("steps", 10, "Timed steps after the compile.")
flags.DEFINE_list("widths", ["8", "16", "32"], "U-Net base widths of the authors' config.")
FLAGS = flags.FLAGS


def step_seconds(config, steps: int) -> float:
    """Seconds per jitted train step on one synthetic batch, after the compile."""
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    mesh = sharding.create_mesh(1, 1, jax.devices()[:1])
    rep = sharding.replicated(mesh)
    state = jax.jit(functools.partial(ts.create_train_state, config, model, tx),
                    out_shardings=rep)()
    step_fn = ts.compile_train_step(config, model, diff, tx, mesh, rep)
    b = config.training.batch_size
    images = np.random.default_rng(0).uniform(-1, 1, (b, *image_shape(config)))
    batch = sharding.global_batch({"image": images.astype(np.float32)}, mesh)
    state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main(_):
    rows = [("ours: configs/fashion_mnist.py", fashion_mnist.get_config())]
    for width in map(int, FLAGS.widths):
        config = authors_fashion_mnist.get_config()
        config.model.model_channels = width
        rows.append((f"authors: configs/authors/fashion_mnist.py, width {width}", config))
    print("| config | parameters | step s (batch 32) | x ours |")
    print("|---|---|---|---|")
    reference = None
    for name, config in rows:
        seconds = step_seconds(config, FLAGS.steps)
        reference = reference or seconds
        total = sum(int(p.size) for p in jax.tree.leaves(describe.abstract_params(config)))
        print(f"| {name} | {total:,} | {seconds:.3f} | {seconds / reference:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
