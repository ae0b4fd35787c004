"""gs:// paths end to end, on a fake bucket (tests/fake_gcs.py: epath's gs:// backend on a
local folder). A reader or writer that bypasses etils.epath (open(), os.path, np.load of a
path string) would look for a local "gs:/bucket/..." and fail here.

Covered: the FID Inception weights (load, hash, convert_inception's writer), the converter's
weight files (.npz, .safetensors) and its missing-file check, Debian's Fashion-MNIST IDX files
(data.debian_dir), the modes' .npz/.json writers and the ablation report with its PNGs. The
image folder scan and warm_start's committed steps are in test_image_folder.py and
test_warm_start.py. No JAX compile here.
"""

import gzip
import hashlib
import json
import os
import struct

import numpy as np
import pytest
from etils import epath
from fake_gcs import fake_gcs

from dmz_jax import modes
from dmz_jax.convert import diffusers, workdir
from dmz_jax.data import fashion_mnist, specs
from dmz_jax.metrics import convert_inception, inception
from experiments import ablations, report
from conftest import ROOT, tiny_config

ARRAYS = {"conv/beta": np.arange(3, dtype=np.float32), "mixed/tower_conv/var": np.ones(2)}


@pytest.fixture
def bucket(tmp_path):
    """The fake gs://bucket; yields its local folder."""
    with fake_gcs(tmp_path / "gcs"):
        yield tmp_path / "gcs" / "bucket"


def test_inception_weights_from_gs(bucket, tmp_path):
    local = tmp_path / "inception.npz"
    convert_inception.save_npz(str(local), ARRAYS)
    convert_inception.save_npz("gs://bucket/fid/inception.npz", ARRAYS)
    assert (bucket / "fid" / "inception.npz").read_bytes() == local.read_bytes()
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    assert inception.file_sha256("gs://bucket/fid/inception.npz") == digest
    params = inception.load_params("gs://bucket/fid/inception.npz", digest)
    np.testing.assert_array_equal(params["conv"]["beta"], ARRAYS["conv/beta"])
    with pytest.raises(inception.FidWeightsError, match="No FID Inception weights at gs://"):
        inception.load_params("gs://bucket/fid/absent.npz", digest)


def safetensors_bytes(arrays: dict) -> bytes:
    """A float32 .safetensors file of `arrays`."""
    header, offset, data = {}, 0, b""
    for name, array in arrays.items():
        raw = np.asarray(array, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(array)),
                        "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_converter_reads_weights_from_gs(bucket):
    weights = {"conv_in.weight": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
               "conv_in.bias": np.array([0.5, -1.0], np.float32)}
    (bucket / "w").mkdir(parents=True)
    (bucket / "w" / "unet.safetensors").write_bytes(safetensors_bytes(weights))
    with epath.Path("gs://bucket/w/unet.npz").open("wb") as f:
        np.savez(f, **weights)
    for name in ("unet.safetensors", "unet.npz"):
        sd = diffusers.load_state_dict(f"gs://bucket/w/{name}")
        assert sorted(sd) == sorted(weights)
        np.testing.assert_array_equal(sd["conv_in.weight"], weights["conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="no weights file gs://bucket/w/absent.npz"):
        workdir.convert_to_workdir(tiny_config(), "gs://bucket/w/absent.npz", "unet",
                                   "gs://bucket/converted")


def idx_gz(array: np.ndarray) -> bytes:
    """Gzipped IDX unsigned-byte file of `array`."""
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_debian_fashion_mnist_from_gs(bucket):
    rng = np.random.default_rng(0)
    folder = bucket / "fashion"
    folder.mkdir(parents=True)
    sizes = {"train": 5, "test": 3}
    expected = {}
    for split, n in sizes.items():
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        expected[split] = images, labels
        for name, array in zip(specs.IDX_FILES[split], (images, labels)):
            (folder / name).write_bytes(idx_gz(array))
    images, labels = fashion_mnist.read_split("gs://bucket/fashion", "test")
    np.testing.assert_array_equal(images, expected["test"][0])
    np.testing.assert_array_equal(labels, expected["test"][1])
    assert fashion_mnist.read_split("gs://bucket/fashion", "train", header_only=True) == 5

    (folder / specs.IDX_FILES["test"][1]).unlink()
    with pytest.raises(FileNotFoundError) as missing:
        fashion_mnist.read_split("gs://bucket/fashion", "test")
    assert missing.value.filename == f"gs://bucket/fashion/{specs.IDX_FILES['test'][1]}"


def test_mode_writers_write_to_gs(bucket):
    codes = np.arange(8, dtype=np.uint8).reshape(2, 4)
    epath.Path("gs://bucket/run/sample").mkdir(parents=True)
    modes._write_npz("gs://bucket/run/sample/codes.npz", codes=codes)
    modes._write_json("gs://bucket/run/sample/metrics.json", {"fd": 1.5})
    with np.load(bucket / "run" / "sample" / "codes.npz") as saved:
        np.testing.assert_array_equal(saved["codes"], codes)
    assert json.loads((bucket / "run" / "sample" / "metrics.json").read_text()) == {"fd": 1.5}
    assert modes.output_dir("gs://bucket/run", "sample") == "gs://bucket/run/sample.1"
    assert (bucket / "run" / "sample.1").is_dir()


def test_ablation_report_to_gs_matches_the_local_one(bucket, tmp_path):
    grid = ablations.load_grid(os.path.join(ROOT, "experiments", "grids", "tiny.py"))
    samples = {}
    for where, folder in (("local", str(tmp_path / "runs")), ("gs", "gs://bucket/runs")):
        grid_png = epath.Path(folder) / "dmz" / "samples.png"
        grid_png.parent.mkdir(parents=True, exist_ok=True)
        grid_png.write_bytes(b"\x89PNG a sample grid")
        samples[where] = str(grid_png)

    def results(where):
        return {(v, 0): {"variant": v, "seed": 0, "step": 4, "latent_dim": 8,
                         "fd": {"ancestral": {str(k): 10.0 + i for i, k in
                                              enumerate(grid["protocol"]["fd_steps"])}},
                         "eval_seconds": 1.0, "hardware": "test",
                         "samples": [samples[where]] if v == "dmz" else []}
                for v in grid["variants"]}
    report.write_report(grid, results("local"), str(tmp_path / "docs" / "results.md"), "cmd")
    report.write_report(grid, results("gs"), "gs://bucket/docs/results.md", "cmd")
    local, remote = tmp_path / "docs", bucket / "docs"
    assert (remote / "results.md").read_text() == (local / "results.md").read_text()
    assert "![samples of dmz](results/samples_dmz.png)" in (remote / "results.md").read_text()
    assert (remote / "results" / "samples_dmz.png").read_bytes() == b"\x89PNG a sample grid"
    pictures = sorted(p.name for p in (local / "results").iterdir())
    assert "fd_vs_k.png" in pictures
    assert sorted(p.name for p in (remote / "results").iterdir()) == pictures
    for name in pictures:
        assert (remote / "results" / name).read_bytes() == (local / "results" / name).read_bytes()
