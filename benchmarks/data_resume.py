"""Seconds from a resume at step S to its first batch, against the replayed stream it replaced.

    python benchmarks/data_resume.py [--config=configs/fashion_mnist.py] [--steps=0,1000,...]

dmz_jax's train stream is a function of the stream position (dmz_jax/data/pipeline.py), so a
run resumed at step S starts reading there. The reference is the stream dmz_jax used before
(cache, shuffle buffer, repeat, then `skip(S * batch)`), which must read every skipped
example again; it is timed only while it stays under --replay_limit seconds. Prints a table.
"""

import time

import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from dmz_jax import data
from dmz_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
flags.DEFINE_list("steps", ["0", "1000", "10000", "100000", "1000000", "100000000"],
                  "Resume steps S.")
flags.DEFINE_float("replay_limit", 30.0, "Stop timing the replayed stream past this many s.")
flags.DEFINE_integer("throughput_batches", 500, "Batches timed per stream for images/s.")
FLAGS = flags.FLAGS


def first_batch_seconds(make_iterator) -> float:
    t0 = time.perf_counter()
    next(make_iterator())
    return time.perf_counter() - t0


def images_per_second(make_iterator, batch_size: int, batches: int) -> float:
    """Steady-state rate of a stream: `batches` batches timed after 20 warm-up ones."""
    it = make_iterator()
    for _ in range(20):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def replayed_stream(data_cfg, batch_size: int, seed: int, start_step: int):
    """The stream before O(1) resume: every one of the start_step * batch_size skipped examples
    passes through the shuffle buffer again (they are not decoded)."""
    source = data._source(data_cfg)
    ds = pipeline.in_memory(source.examples(data_cfg, "train"))
    ds = tf.data.Dataset.from_tensor_slices(ds)
    ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(start_step * batch_size).map(source.example_fn(data_cfg))
    return ds.batch(batch_size, drop_remainder=True).as_numpy_iterator()


def main(_):
    logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    b, seed = config.training.batch_size, config.seed
    info = data.dataset_info(config.data)
    first_batch_seconds(lambda: replayed_stream(config.data, b, seed, 0))  # warm TF up
    print(f"{info.name} ({info.source}, {info.num_train_examples} train examples), batch {b}\n")
    print("| resume step S | examples skipped | dmz_jax s | replayed stream s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    replay_ok = True
    for s in map(int, FLAGS.steps):
        ours = first_batch_seconds(lambda: data.train_iterator(
            config.data, batch_size=b, seed=seed, process_index=0, process_count=1,
            start_step=s))
        replay = "not run"
        if replay_ok:
            t = first_batch_seconds(lambda: replayed_stream(config.data, b, seed, s))
            replay, replay_ok = f"{t:.2f}", t < FLAGS.replay_limit
            replay += f" | {t / ours:.1f}x"
        else:
            replay += " | -"
        print(f"| {s:,} | {s * b:,} | {ours:.2f} | {replay} |", flush=True)
    print("\n| round | dmz_jax img/s | replayed stream img/s |\n|---:|---:|---:|")
    for r in range(3):  # alternated: the machine's load drifts
        ours = images_per_second(lambda: data.train_iterator(
            config.data, batch_size=b, seed=seed, process_index=0, process_count=1), b,
            FLAGS.throughput_batches)
        old = images_per_second(lambda: replayed_stream(config.data, b, seed, 0), b,
                                FLAGS.throughput_batches)
        print(f"| {r} | {ours:,.0f} | {old:,.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
