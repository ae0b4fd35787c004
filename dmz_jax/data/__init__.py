"""Datasets as numpy batches of images in [-1, 1]: fashion_mnist, fashion_mnist_edges, cifar10,
celeb_a, image_folder.

data_cfg: config.data (dmz_jax/config_base.py), checked by the config checks. No TensorFlow at
import: each function imports the module that reads data_cfg.name when called.
"""

import importlib

from dmz_jax.data.specs import DatasetInfo, DatasetNotFoundError, ImageFolderError

__all__ = ["DatasetInfo", "DatasetNotFoundError", "ImageFolderError", "dataset_info",
           "train_iterator", "load_split", "split_batches", "pairing_keys"]


def _source(data_cfg):
    """The module that reads data_cfg.name (tfds_source for cifar10 and celeb_a)."""
    own = ("fashion_mnist", "fashion_mnist_edges", "image_folder")
    module = data_cfg.name if data_cfg.name in own else "tfds_source"
    return importlib.import_module(f"dmz_jax.data.{module}")


def dataset_info(data_cfg) -> DatasetInfo:
    """Cheap (an image folder is scanned once); never downloads unless data.download.

    Raises DatasetNotFoundError, whose message has the numbered steps to get the data.
    """
    return _source(data_cfg).dataset_info(data_cfg)


def train_iterator(data_cfg, *, batch_size: int, seed: int, process_index=None,
                   process_count=None, start_step: int = 0):
    """Infinite iterator of numpy batches {"image": float32 [B, S, S, C] in [-1, 1], "label":
    int32 [B]} (+ "attributes": int32 [B, 40] for celeb_a); B = batch_size, per process.

    The job's global batch of step s (batch_size * process_count examples) is a function of
    (seed, s) alone: the train split, held in memory undecoded by every process, reshuffled
    every epoch; process p (default: jax's) yields its rows p * batch_size ... of it. So 1
    process with 1 or 8 devices and 2 processes train on the same batches, and a resume
    onto another topology is exact. Batch start_step is exactly what an iterator started at
    0 yields after start_step batches, reached in O(1) (nothing is replayed): resumed
    training is bit-exact and resumes at once. Raises DatasetNotFoundError at the call, not
    at the first next().
    """
    import jax
    from dmz_jax.data import pipeline
    return pipeline.train_iterator(
        _source(data_cfg), data_cfg, batch_size=batch_size, seed=seed, start_step=start_step,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count)


def load_split(data_cfg, split: str, max_examples=None) -> dict:
    """The first max_examples (None: all) of `split`, in a fixed order, the same in every
    process; no augmentation. Returns numpy arrays as a train_iterator batch, N of them."""
    from dmz_jax.data import pipeline
    return pipeline.load_split(_source(data_cfg), data_cfg, split, max_examples)


def split_batches(data_cfg, split: str, max_examples=None, batch_size: int = 4096):
    """load_split in pieces, for splits too large to hold decoded: an iterator of dicts as
    load_split returns, of at most batch_size rows each, the same rows in the same order."""
    from dmz_jax.data import pipeline
    return pipeline.split_batches(_source(data_cfg), data_cfg, split, max_examples, batch_size)


def pairing_keys(data_cfg, split: str):
    """A key per example of `split` [N], in load_split's order, without decoding any image: the
    file's path under data.image_dir (image_folder), else the label. Datasets whose row i
    shows the same object (Edges2Handbags' halves split by tools/split_edges2handbags.py;
    fashion_mnist and fashion_mnist_edges) have equal keys; N is the split's size."""
    import numpy as np
    from dmz_jax.data import pipeline, specs
    if split not in specs.SPLITS[data_cfg.name]:
        raise ValueError(f"Unknown split {split!r} for {data_cfg.name}")
    if data_cfg.name == "image_folder":
        from dmz_jax.data import image_folder
        root = image_folder._absolute(data_cfg.image_dir) + "/"  # local or gs://
        files = image_folder.scan(data_cfg).split(split)[0]
        return np.array([str(f)[len(root):] for f in files], dtype=str)
    labels = _source(data_cfg).examples(data_cfg, split).map(
        lambda ex: ex["label"], num_parallel_calls=pipeline.AUTOTUNE)
    parts = list(labels.batch(65536).as_numpy_iterator())
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)
