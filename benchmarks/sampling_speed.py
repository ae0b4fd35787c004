"""Sampling throughput of a config's model at K respaced steps; prints a table.

    python benchmarks/sampling_speed.py --config=configs/fashion_mnist.py [--steps=10,100]

Untrained (initialised) parameters: the speed does not depend on the weights. Each K is
compiled once (timed apart), then `--batches` batches of sampling.batch_size images are timed,
split over all devices as `--mode=evaluate` does.
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from dmz_jax import api, sharding
from dmz_jax import train_state as ts
from dmz_jax.model import create_model

config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_list("steps", ["10", "100"], "Respaced step counts K.")
flags.DEFINE_integer("batches", 3, "Timed batches per K after the compile.")
FLAGS = flags.FLAGS


def main(_):
    config = FLAGS.config
    model, tx = create_model(config), ts.make_optimizer(config.training)
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    state = jax.jit(lambda: ts.create_train_state(config, model, tx),
                    out_shardings=sharding.replicated(mesh))()
    m = api.Model(config, model, ts.make_diffusion(config), state.ema_params, 0, None, mesh)
    b = m.batch_size
    print("| device | K | batch | compile+first batch s | batch s | img/s |")
    for k in map(int, FLAGS.steps):
        t0 = time.perf_counter()
        m.sample(b, steps=k)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.sample(b * FLAGS.batches, steps=k)
        dt = (time.perf_counter() - t0) / FLAGS.batches
        print(f"| {jax.devices()[0].device_kind} x{jax.device_count()} | {k} | {b} | "
              f"{first:.1f} | {dt:.2f} | {b / dt:.1f} |")


if __name__ == "__main__":
    app.run(main)
