"""XLA's compiled memory of the train step with each memory/precision knob alone and all on.

    python benchmarks/memory_knobs.py --config=configs/fashion_mnist.py [--accum=4] [--steps=3]
    python benchmarks/memory_knobs.py --config=configs/cifar10.py \
        --config.training.batch_size=8 --accum=2 --steps=0

Each variant compiles the train loop's own step (`compile_train_step`, state donated) on one
device from abstract shapes (nothing is allocated for the memory columns) and prints
`compiled.memory_analysis()` in MiB:
  args   the state and the batch (live for the whole step);
  out    the new state and the metrics;
  alias  output bytes written into donated argument buffers (counted once, in args);
  temp   XLA's one scratch allocation for every intermediate (activations kept for the
         backward pass, gradients, optimizer temporaries), sized by its heap simulation;
  peak   args + out - alias + temp: every byte the executable holds during the step
         (XLA's own `peak_memory_in_bytes` is not used: on CPU it reports the arguments only);
and, from JAX rather than XLA (so the same on every backend):
  resid  the values JAX saves for the backward pass of one microbatch's loss (activations,
         not the parameters and inputs): what remat and bfloat16 shrink before XLA's own
         scheduling, fusion and common-subexpression elimination.
With --steps > 0, also the mean seconds of that many steps after one warm-up step (random
images; the state is initialised under jit once per variant).
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
from dmz_jax.config_checks import check_config
from dmz_jax.model import create_model, image_shape

config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
flags.DEFINE_integer("accum", 4, "training.grad_accum_steps of the accumulation variants.")
flags.DEFINE_integer("steps", 3, "Timed steps per variant after a warm-up step; 0: none.")
flags.DEFINE_list("variants", [], "Run only these variants (default: all).")
FLAGS = flags.FLAGS

MIB = 2.0 ** 20


def variants(accum: int) -> dict[str, dict]:
    """Name -> config overrides {dotted key: value}: the default, each knob alone, all four."""
    knobs = {"bfloat16": {"model.dtype": "bfloat16"},
             f"accum{accum}": {"training.grad_accum_steps": accum},
             "remat": {"model.remat": True},
             "dot_product_attention": {"model.attention_impl": "dot_product_attention"}}
    every = {k: v for overrides in knobs.values() for k, v in overrides.items()}
    return {"default": {}, **knobs, "all": every}


def with_overrides(config, overrides: dict):
    """A copy of `config` with {dotted key: value} set."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        setattr(functools.reduce(getattr, section.split("."), config), name, value)
    return config


def compile_step(config):
    """(compiled step, (model, optimizer, mesh), seconds to lower and compile it)."""
    model, diff = create_model(config), ts.make_diffusion(config)
    tx = ts.make_optimizer(config.training)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    step = ts.compile_train_step(config, model, diff, tx, mesh, sharding.replicated(mesh))
    state = jax.eval_shape(lambda: ts.create_train_state(config, model, tx))
    batch = {"image": jax.ShapeDtypeStruct((config.training.batch_size, *image_shape(config)),
                                           jnp.float32)}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, (model, tx, mesh), time.perf_counter() - t0


def memory_row(compiled) -> dict[str, float]:
    """The memory columns in MiB (see the module docstring)."""
    m = compiled.memory_analysis()
    row = {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    row["peak"] = row["args"] + row["out"] - row["alias"] + row["temp"]
    return {k: v / MIB for k, v in row.items()}


def residual_mib(config) -> float:
    """MiB that JAX saves for the backward pass of the loss of one microbatch
    (batch_size / grad_accum_steps images), excluding the arguments; traced, not run."""
    from jax._src.ad_checkpoint import saved_residuals  # print_saved_residuals' list
    model, diff = create_model(config), ts.make_diffusion(config)
    loss = functools.partial(ts._loss_fn, model=model, diff=diff, config=config)
    b = config.training.batch_size // config.training.grad_accum_steps
    params = jax.eval_shape(lambda: ts.create_train_state(
        config, model, ts.make_optimizer(config.training)).params)
    x = jax.ShapeDtypeStruct((b, *image_shape(config)), jnp.float32)
    rngs = dict(zip(("t", "noise", "dropout", "latent"), jax.random.split(jax.random.key(0), 4)))
    saved = saved_residuals(lambda p, x, t, n: loss(p, x, t, n, rngs)[0], params, x,
                            jax.ShapeDtypeStruct((b,), jnp.int32), x)
    return sum(a.size * a.dtype.itemsize for a, why in saved
               if not why.startswith("from the argument")) / MIB


def time_steps(config, compiled, pieces, steps: int) -> float:
    """Mean seconds per step of `compiled` over `steps` steps after one warm-up step."""
    model, tx, mesh = pieces
    state = jax.jit(lambda: ts.create_train_state(config, model, tx),
                    out_shardings=sharding.replicated(mesh))()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (config.training.batch_size, *image_shape(config)))
    batch = sharding.global_batch({"image": images.astype(np.float32)}, mesh)
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def main(_):
    config = FLAGS.config
    print(f"config: batch {config.training.batch_size}, image {image_shape(config)}, "
          f"{jax.devices()[0].device_kind} (jax {jax.__version__}); MiB from XLA's "
          f"memory_analysis of the compiled train step")
    columns = ("args", "out", "alias", "temp", "peak", "resid")
    print("| variant | " + " | ".join(columns) + " | compile s | step s |")
    print("|---" * (len(columns) + 3) + "|")
    for name, overrides in variants(FLAGS.accum).items():
        if FLAGS.variants and name not in FLAGS.variants:
            continue
        variant = with_overrides(config, overrides)
        check_config(variant, num_devices=1, process_count=1)
        compiled, pieces, compile_s = compile_step(variant)
        row = {**memory_row(compiled), "resid": residual_mib(variant)}
        step_s = time_steps(variant, compiled, pieces, FLAGS.steps) if FLAGS.steps else None
        cells = [f"{row[c]:.1f}" for c in columns] + [f"{compile_s:.1f}",
                                                      f"{step_s:.3f}" if step_s else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
