"""The tf.data pipeline every source shares: examples -> numpy batches of float32 [-1, 1] images.

A source module (tfds_source, fashion_mnist, image_folder) provides
  examples(data_cfg, split, seed=None, process_index=0, process_count=1) -> tf.data.Dataset:
    the process's equal share of `split`, not decoded; seed None: in a fixed order;
  example_fn(data_cfg): an example -> {"image": float32 [S, S, C] in [-1, 1], "label", ...}.
Importing this module hides the GPUs from TensorFlow (every source imports it first).
"""

import logging

import numpy as np
import tensorflow as tf

from dmz_jax.data import specs

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError) as _e:  # TF already initialised its devices.
    logging.getLogger(__name__).warning("Could not hide the GPUs from TensorFlow: %s", _e)

AUTOTUNE = tf.data.AUTOTUNE


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
    """Values 0..255 (any dtype) -> float32 x / 127.5 - 1, clipped to [-1, 1]."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """[H, W, C] 0..255 -> float32 [size, size, C], bilinear with antialias (none if same size)."""
    image = tf.cast(image, tf.float32)
    if tuple(image.shape[:2]) == (size, size):
        return image
    return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def mix_seed(seed: int, process_index: int) -> int:
    """A non-negative int31 seed that differs between processes."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process_index]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def train_iterator(source, data_cfg, *, batch_size: int, seed: int, process_index: int,
                   process_count: int, start_step: int):
    """See dmz_jax.data.train_iterator; `source` is the module that reads data_cfg.name.

    Shuffle (reshuffled every epoch), repeat, skip start_step batches before decoding, decode,
    flip left-right (data.random_flip: a stateless function of (seed, stream position)), batch.
    """
    seed = mix_seed(seed, process_index)
    ds = source.examples(data_cfg, "train", seed, process_index, process_count)
    if data_cfg.name == "image_folder":  # file names: shuffle all of them
        buffer = int(ds.cardinality())
    else:
        buffer = int(data_cfg.shuffle_buffer)
        if data_cfg.name != "celeb_a":  # decoded uint8: 47 MB / 150 MB
            ds = ds.cache()
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(int(start_step) * int(batch_size))
    ds = ds.map(source.example_fn(data_cfg), num_parallel_calls=AUTOTUNE)
    if data_cfg.random_flip:
        def flip(index, ex):
            op_seed = tf.stack([tf.constant(seed, tf.int64), index])
            return {**ex, "image": tf.image.stateless_random_flip_left_right(ex["image"], op_seed)}
        ds = ds.enumerate(start=int(start_step) * int(batch_size))
        ds = ds.map(flip, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(int(batch_size), drop_remainder=True).prefetch(AUTOTUNE)
    return ds.as_numpy_iterator()


def load_split(source, data_cfg, split: str, max_examples=None) -> dict:
    """See dmz_jax.data.load_split; `source` is the module that reads data_cfg.name."""
    if split not in specs.SPLITS[data_cfg.name]:
        raise ValueError(f"Unknown split {split!r} for {data_cfg.name}; expected one of "
                         f"{list(specs.SPLITS[data_cfg.name])}.")
    ds = source.examples(data_cfg, split)
    if max_examples is not None:
        ds = ds.take(max_examples)
    ds = ds.map(source.example_fn(data_cfg), num_parallel_calls=AUTOTUNE)
    batches = list(ds.batch(1024).prefetch(2).as_numpy_iterator())
    if not batches:
        return {k: np.zeros((0, *s.shape), s.dtype.as_numpy_dtype)
                for k, s in ds.element_spec.items()}
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
