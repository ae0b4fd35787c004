"""The tf.data pipeline every source shares: examples -> numpy batches of float32 [-1, 1] images.

A source module (tfds_source, fashion_mnist, image_folder) provides
  examples(data_cfg, split, process_index=0, process_count=1) -> tf.data.Dataset:
    the process's equal share of `split`, not decoded, in a fixed order;
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


def in_memory(ds: tf.data.Dataset):
    """All elements of a finite `ds` (undecoded examples) as tensors with a leading axis N.

    Decoded uint8 images (Fashion-MNIST 47 MB, CIFAR-10 150 MB), JPEG bytes (CelebA about
    1.4 GB) or file names (image folders): read once per start, however far training got.
    """
    batches = list(ds.batch(4096).prefetch(2).as_numpy_iterator())
    if not batches:
        raise ValueError("The train split of this process is empty.")
    return tf.nest.map_structure(lambda *parts: tf.constant(np.concatenate(parts)), *batches)


def stream_positions(first: int, n: int, seed: int) -> tf.data.Dataset:
    """(k, j) int64 for k = first, first + 1, ...: position k of the stream reads example j of
    n; epoch e = k // n is the permutation stateless_shuffle(range(n), seed=(seed, e)).

    (tf.random.experimental.index_shuffle would need no permutation in memory, but it reads
    only the low 8 bits of each seed word: epochs e and e + 256 would repeat an order.)
    """
    first_epoch, offset = divmod(first, n)
    seed = tf.constant(seed, tf.int64)

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                         seed=tf.stack([seed, e]))
        return tf.data.Dataset.from_tensor_slices((e * n + tf.range(n, dtype=tf.int64), order))
    epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max // n)
    return epochs.flat_map(epoch).skip(offset)


def train_iterator(source, data_cfg, *, batch_size: int, seed: int, process_index: int,
                   process_count: int, start_step: int):
    """See dmz_jax.data.train_iterator; `source` is the module that reads data_cfg.name.

    One stream for the whole job: element k = step * G + row of the global batch (G =
    batch_size * process_count) is a pure function of (seed, k) (`stream_positions`), and
    data.random_flip flips it with the stateless seed (seed, k). Process p yields rows
    p * batch_size ... (p + 1) * batch_size - 1 of every global batch (the rows its devices
    hold on a mesh made from jax.devices()), so the global batch of a step is the same on
    1 process with 1 or 8 devices or on several processes, and a resume onto another
    topology reads the same data. Every process holds the whole train split, undecoded, and
    decodes only its rows. A resumed stream starts at k = start_step * G; the cost of
    getting there is at most one epoch of integers, whatever the step.
    """
    seed = mix_seed(seed, 0)  # not the process: the stream is the job's
    table = in_memory(source.examples(data_cfg, "train"))
    n = int(tf.nest.flatten(table)[0].shape[0])
    decode = source.example_fn(data_cfg)
    global_batch, first_row = batch_size * process_count, batch_size * process_index

    def example_at(k, j):
        ex = tf.nest.map_structure(lambda column: tf.gather(column, j), table)
        ex = decode(*ex) if isinstance(ex, tuple) else decode(ex)
        if data_cfg.random_flip:
            op_seed = tf.stack([tf.constant(seed, tf.int64), k])
            ex = {**ex, "image": tf.image.stateless_random_flip_left_right(ex["image"], op_seed)}
        return ex

    ds = stream_positions(int(start_step) * global_batch, n, seed)
    if process_count > 1:
        def mine(k, j):
            del j
            row = k % global_batch
            return (row >= first_row) & (row < first_row + batch_size)
        ds = ds.filter(mine)
    ds = ds.map(example_at, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(int(batch_size), drop_remainder=True).prefetch(AUTOTUNE)
    return ds.as_numpy_iterator()


def _split_examples(source, data_cfg, split: str, max_examples=None) -> tf.data.Dataset:
    """The first max_examples (None: all) examples of `split`, decoded, in a fixed order."""
    if split not in specs.SPLITS[data_cfg.name]:
        raise ValueError(f"Unknown split {split!r} for {data_cfg.name}; expected one of "
                         f"{list(specs.SPLITS[data_cfg.name])}.")
    ds = source.examples(data_cfg, split)
    if max_examples is not None:
        ds = ds.take(max_examples)
    return ds.map(source.example_fn(data_cfg), num_parallel_calls=AUTOTUNE)


def split_batches(source, data_cfg, split: str, max_examples=None, batch_size: int = 4096):
    """See dmz_jax.data.split_batches; `source` is the module that reads data_cfg.name."""
    ds = _split_examples(source, data_cfg, split, max_examples)
    return ds.batch(int(batch_size)).prefetch(2).as_numpy_iterator()


def load_split(source, data_cfg, split: str, max_examples=None) -> dict:
    """See dmz_jax.data.load_split; `source` is the module that reads data_cfg.name."""
    ds = _split_examples(source, data_cfg, split, max_examples)
    batches = list(ds.batch(1024).prefetch(2).as_numpy_iterator())
    if not batches:
        return {k: np.zeros((0, *s.shape), s.dtype.as_numpy_dtype)
                for k, s in ds.element_spec.items()}
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
