"""Splits the Edges2Handbags release into 64x64 edge maps and photos (image_folder layout).

    python tools/split_edges2handbags.py SRC OUT [--size 64]

SRC is the unpacked pix2pix release `edges2handbags` (its train/ and val/ folders of 256x512
JPEGs, each an edge map on the left and the photo on the right; 138,567 train and 200 val
pairs). It cannot be downloaded on a machine without network access: fetch
`edges2handbags.tar.gz` from the pix2pix datasets page (the CycleGAN/pix2pix repository's
`datasets/download_pix2pix_dataset.sh edges2handbags`) and unpack it.

Writes, for each split s in (train, val), OUT/edges_s/NAME.png (one channel: luma
0.299 R + 0.587 G + 0.114 B, as PIL's "L") and OUT/handbags_s/NAME.png (RGB), each resized to
--size with an antialiased bicubic filter (the authors use PIL's default resize filter,
bicubic). The same NAME in both folders is one pair, so two image_folder datasets with the
same data.split_seed split the pairs identically (configs/authors/edges64.py, handbags64.py
read OUT/edges_train and OUT/handbags_train).
"""

import argparse
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow only decodes and resizes here
import tensorflow as tf  # noqa: E402

LUMA = tf.constant([0.299, 0.587, 0.114])


def split_pair(jpeg: bytes, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A 256x512 pair -> (edges uint8 [size, size, 1], photo uint8 [size, size, 3])."""
    image = tf.cast(tf.io.decode_image(jpeg, channels=3, expand_animations=False), tf.float32)
    half = image.shape[1] // 2
    halves = image[:, :half], image[:, half:]
    edges, photo = (tf.image.resize(h, (size, size), method="bicubic", antialias=True)
                    for h in halves)
    edges = tf.reduce_sum(edges * LUMA, axis=-1, keepdims=True)
    to_uint8 = lambda x: tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)  # noqa: E731
    return to_uint8(edges), to_uint8(photo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for split in ("train", "val"):
        folder = os.path.join(args.src, split)
        if not os.path.isdir(folder):
            raise SystemExit(f"{folder} is missing: SRC must be the unpacked edges2handbags "
                             "release (train/ and val/); see this script's docstring.")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".png")))
        for kind in ("edges", "handbags"):
            os.makedirs(os.path.join(args.out, f"{kind}_{split}"), exist_ok=True)
        for name in names:
            edges, photo = split_pair(tf.io.read_file(os.path.join(folder, name)), args.size)
            stem = os.path.splitext(name)[0] + ".png"
            for kind, image in (("edges", edges), ("handbags", photo)):
                tf.io.write_file(os.path.join(args.out, f"{kind}_{split}", stem),
                                 tf.io.encode_png(image))
        print(f"{split}: {len(names)} pairs -> {args.out}/{{edges,handbags}}_{split}")


if __name__ == "__main__":
    main()
