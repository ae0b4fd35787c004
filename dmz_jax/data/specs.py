"""What each dataset is, in one place, in pure Python (no TensorFlow, no devices).

The config checks, `--mode=describe` and every data source read their facts from here.
"""

from __future__ import annotations

import dataclasses
import os

DATASET_NAMES = ("fashion_mnist", "fashion_mnist_edges", "cifar10", "celeb_a", "image_folder")
FASHION_SOURCES = ("auto", "tfds", "debian", "bundled")  # data.source, fashion_mnist(_edges)
BAD_IMAGE_POLICIES = ("skip", "error")  # data.bad_images, image_folder only
WRONG_SIZE_POLICIES = ("resize", "skip", "error")  # data.wrong_size, image_folder only


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts of a tfds dataset.

    raw_shape: (H, W, C) of the stored images, before any crop, pad or resize.
    num_classes: 0 when there are no class labels (the pipeline's label is then always 0).
    num_examples: split -> size of the full dataset (when tfds's metadata does not say).
    min_image_size: the smallest data.image_size the pipeline can produce (it pads
      Fashion-MNIST, never crops it).
    """

    tfds_name: str
    raw_shape: tuple[int, int, int]
    num_classes: int
    num_examples: dict
    min_image_size: int = 8

    @property
    def channels(self) -> int:
        return self.raw_shape[2]


SPECS = {
    "fashion_mnist": DatasetSpec("fashion_mnist", (28, 28, 1), 10,
                                 {"train": 60_000, "test": 10_000}, min_image_size=28),
    # the same images, each replaced by its edge map (dmz_jax/data/fashion_mnist_edges.py)
    "fashion_mnist_edges": DatasetSpec("fashion_mnist", (28, 28, 1), 10,
                                       {"train": 60_000, "test": 10_000}, min_image_size=28),
    "cifar10": DatasetSpec("cifar10", (32, 32, 3), 10, {"train": 50_000, "test": 10_000}),
    "celeb_a": DatasetSpec("celeb_a", (218, 178, 3), 0,
                           {"train": 162_770, "validation": 19_867, "test": 19_962}),
}

# CelebA crop presets on the aligned 218x178 image: (top, left, height, width) in pixels.
CELEBA_CROPS = {
    "diffae": (57, 25, 128, 128),  # DDIM / Diff-AE: rows 57:185, cols 25:153
    "center": (20, 0, 178, 178),  # the central square
    # the full frame, squashed to a square by the resize (the authors' CelebA-64; they resize
    # with OpenCV's bilinear filter, which does not antialias, ours does)
    "resize": (0, 0, 218, 178),
}

# The 40 binary attributes, in the order of list_attr_celeba.txt and tfds `celeb_a`.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where Debian's dataset-fashion-mnist installs the original IDX files; split -> (images, labels).
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# The shipped subset: first 10000 train / 2000 test examples (see data/README.md).
BUNDLED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_subset.npz")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # image_folder, case ignored
SPLITS = {**{name: tuple(spec.num_examples) for name, spec in SPECS.items()},
          "image_folder": ("train", "test")}


class DatasetNotFoundError(RuntimeError):
    """The requested dataset is not available locally; the message says how to get it."""


class ImageFolderError(DatasetNotFoundError):
    """A file of data.image_dir violates an "error" policy; the message names it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about the data of a run.

    name: a DATASET_NAMES entry. image_size: side in pixels of the square images yielded.
    channels: 1 or 3. num_classes: 0 when there are no class labels. num_train_examples:
    the whole train split, all processes together. source: where the data is read from
    ("tfds" | "debian" | "bundled" | "image_folder").
    """

    name: str
    image_size: int
    channels: int
    num_classes: int
    num_train_examples: int
    source: str
