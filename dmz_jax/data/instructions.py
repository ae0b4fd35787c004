"""How to get a missing dataset: the numbered steps of DatasetNotFoundError messages."""

import os

from dmz_jax.data import specs


def _dir_text(data_dir) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def tfds_dataset(name: str, data_dir) -> str:
    """Steps to prepare tfds `name` ("cifar10" | "celeb_a") in `data_dir` (None: tfds's)."""
    d = _dir_text(data_dir)
    dd = f", data_dir='{d}'" if data_dir else ""
    prepare = ("python -c \"import tensorflow_datasets as tfds; "
               f"tfds.builder('{name}'{dd}).download_and_prepare()\"")
    if name == "celeb_a":
        return (
            f"CelebA (tfds 'celeb_a', version 2.1.0) is not prepared in {d}. TFDS fetches it\n"
            "from Google Drive, which is often over quota; to prepare it by hand:\n"
            "  1. From the CelebA page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html\n"
            "     (Google Drive / Baidu links, 'Align&Cropped Images') download these five\n"
            "     files, keeping their names:\n"
            "       Img/img_align_celeba.zip              (1,443,490,838 bytes)\n"
            "       Eval/list_eval_partition.txt\n"
            "       Anno/list_attr_celeba.txt\n"
            "       Anno/list_landmarks_align_celeba.txt\n"
            "       Anno/identity_CelebA.txt\n"
            f"  2. Put all five (flat, no subfolders) into {d}/downloads/manual/\n"
            f"  3. Run\n       {prepare}\n"
            "     tfds takes the files from downloads/manual/ (checking their sha256 against\n"
            "     its registered checksums: re-zipped copies from other mirrors fail) and\n"
            f"     writes {d}/celeb_a/2.1.0/ (~1.4 GB; tens of minutes).\n"
            "  4. Or copy a prepared celeb_a/2.1.0/ folder from another machine to\n"
            f"     {d}/celeb_a/2.1.0/.")
    return (
        f"CIFAR-10 (tfds '{name}') is not prepared in {d}. To get it:\n"
        f"  1. On a machine with network access run\n       {prepare}\n"
        "     (downloads ~163 MB from cs.toronto.edu, writes ~130 MB).\n"
        f"  2. If that machine is not this one, copy its {d}/{name}/ folder (the\n"
        f"     '3.0.2/' subfolder with dataset_info.json) to {d}/{name}/ here.\n"
        "  3. Or set data.download=True to let the pipeline download it itself.")


def fashion_mnist(data_cfg, tried: list) -> str:
    """Steps to make any Fashion-MNIST source available; `tried`: why each one failed."""
    d = _dir_text(data_cfg.data_dir)
    return (
        f"Fashion-MNIST is not available (data.source={data_cfg.source!r}). Tried:"
        + "".join(f"\n  - {t}" for t in tried) + "\n"
        "Any one of these makes it available:\n"
        "  1. Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
        f"     (installs the IDX files into {specs.DEBIAN_DIR}; or put the four\n"
        f"     original *-ubyte.gz files into data.debian_dir={data_cfg.debian_dir}), then use\n"
        "     data.source='auto' or 'debian'.\n"
        "  2. With network access: python -c \"import tensorflow_datasets as tfds; "
        "tfds.builder('fashion_mnist').download_and_prepare()\"\n"
        f"     (or copy a prepared fashion_mnist/ folder into {d}), then data.source='auto'.\n"
        f"  3. Restore the bundled subset {specs.BUNDLED_PATH}\n"
        "     (python tools/make_fashion_mnist_subset.py, from the Debian files) and use\n"
        "     data.source='auto' or 'bundled'.")
