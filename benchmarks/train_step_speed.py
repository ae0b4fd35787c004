"""Times the jitted train step of a config on synthetic data; prints a table.

    python benchmarks/train_step_speed.py --config=configs/fashion_mnist.py [--steps=20]
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dmz_jax import sharding
from dmz_jax import train_state as ts
from dmz_jax.model import create_model, image_shape

config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("steps", 20, "Timed steps after the compile.")
FLAGS = flags.FLAGS


def main(_):
    config = FLAGS.config
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    rep = sharding.replicated(mesh)
    t0 = time.perf_counter()
    state = jax.jit(functools.partial(ts.create_train_state, config, model, tx),
                    out_shardings=rep)()
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    step_fn = ts.compile_train_step(config, model, diff, tx, mesh, rep)
    b = config.training.batch_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (b, *image_shape(config))).astype(np.float32),
             "label": np.zeros((b,), np.int32)}
    batch = sharding.global_batch(batch, mesh)
    with mesh:
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        jax.block_until_ready(m)
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, m = step_fn(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / FLAGS.steps
    print(f"| device | batch | init+compile s | first step s | step s | img/s |")
    print(f"| {jax.devices()[0].device_kind} x{jax.device_count()} | {b} | {t_init:.1f} | "
          f"{t_compile:.1f} | {dt:.3f} | {b / dt:.0f} |")


if __name__ == "__main__":
    app.run(main)
