"""cifar10 and celeb_a (and Fashion-MNIST's tfds/debian sources) read with tfds builders.

Never downloads unless data.download is True. Every image is x / 127.5 - 1, then:
  fashion_mnist 28x28x1: padded with -1 (black) to image_size, centred, odd pixel bottom/right;
  cifar10 32x32x3: as is (bilinear resize with antialias if image_size != 32);
  celeb_a 218x178x3 JPEG: only the box specs.CELEBA_CROPS[data.crop] is decoded, then resized
    as cifar10; label is 0 and "attributes" int32 [40] in {0, 1} (specs.CELEBA_ATTRIBUTES).
"""

import logging

from dmz_jax.data import instructions, pipeline  # pipeline first: it hides the GPUs from TF
from dmz_jax.data.specs import (CELEBA_ATTRIBUTES, CELEBA_CROPS, SPECS, DatasetInfo,
                                DatasetNotFoundError)

import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)


def is_prepared(builder) -> bool:
    """builder.is_prepared(), without tfds's warning when its folder does not even exist."""
    return tf.io.gfile.exists(builder.data_dir) and builder.is_prepared()


def num_examples(builder, name: str, split: str) -> int:
    """Size of `split` from tfds's metadata, else from specs."""
    try:
        return int(builder.info.splits[split].num_examples) or SPECS[name].num_examples[split]
    except KeyError:  # not prepared yet
        return SPECS[name].num_examples[split]


def prepare(builder, how_to_get: str = "", **kwargs):
    """`builder`, after download_and_prepare(**kwargs) if needed; download errors are wrapped
    in DatasetNotFoundError(how_to_get) unless how_to_get is empty."""
    if not is_prepared(builder):
        log.info("Preparing tfds %r in %s (once).", builder.name, builder.data_dir)
        try:
            builder.download_and_prepare(**kwargs)
        except Exception as e:  # noqa: BLE001  (network/checksum errors come in many types)
            if not how_to_get:
                raise
            raise DatasetNotFoundError(f"{how_to_get}\nDownload failed: {e!r}") from e
    return builder


def read(builder, name: str, split: str, process_index: int = 0,
         process_count: int = 1) -> tf.data.Dataset:
    """This process's equal share of `split` (remainder dropped), in a fixed order:
    {"image": uint8 [H, W, C] (celeb_a: JPEG bytes), "label": int32 [] [, "attributes": [40]]}."""
    if process_count > 1:
        split = tfds.split_for_jax_process(split, process_index=process_index,
                                           process_count=process_count, drop_remainder=True)
    decoders = {"image": tfds.decode.SkipDecoding()} if name == "celeb_a" else None
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(try_autocache=False))

    def canonical(ex):
        if name != "celeb_a":
            return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)}
        attributes = [tf.cast(ex["attributes"][k], tf.int32) for k in CELEBA_ATTRIBUTES]
        return {"image": ex["image"], "label": tf.zeros([], tf.int32),
                "attributes": tf.stack(attributes)}
    return ds.map(canonical, num_parallel_calls=pipeline.AUTOTUNE)


def example_fn(data_cfg):
    """Example of `read` -> same with "image" float32 [S, S, C] in [-1, 1] (S = image_size)."""
    name, size = data_cfg.name, int(data_cfg.image_size)

    def fn(ex):
        image = ex["image"]
        if name in ("fashion_mnist", "fashion_mnist_edges"):  # edges: filtered after this
            image = pipeline.to_unit_range(image)
            h, w = int(image.shape[0]), int(image.shape[1])
            top, left = (size - h) // 2, (size - w) // 2
            paddings = [[top, size - h - top], [left, size - w - left], [0, 0]]
            return {**ex, "image": tf.pad(image, paddings, constant_values=-1.0)}
        if name == "celeb_a":
            box = CELEBA_CROPS[data_cfg.crop]
            image = tf.image.decode_and_crop_jpeg(image, tf.constant(box, tf.int32), channels=3)
            image.set_shape(box[2:] + (3,))
        return {**ex, "image": pipeline.to_unit_range(pipeline.resize(image, size))}
    return fn


def _builder(data_cfg):
    builder = tfds.builder(SPECS[data_cfg.name].tfds_name, data_dir=data_cfg.data_dir)
    if not is_prepared(builder) and not data_cfg.download:
        raise DatasetNotFoundError(instructions.tfds_dataset(data_cfg.name, data_cfg.data_dir))
    return builder


def dataset_info(data_cfg) -> DatasetInfo:
    name, spec = data_cfg.name, SPECS[data_cfg.name]
    return DatasetInfo(name, int(data_cfg.image_size), spec.channels, spec.num_classes,
                       num_examples(_builder(data_cfg), name, "train"), "tfds")


def examples(data_cfg, split, process_index=0, process_count=1):
    how_to_get = instructions.tfds_dataset(data_cfg.name, data_cfg.data_dir)
    return read(prepare(_builder(data_cfg), how_to_get), data_cfg.name, split, process_index,
                process_count)
