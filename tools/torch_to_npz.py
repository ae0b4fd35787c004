"""Converts a PyTorch checkpoint (.pt / .pth / .bin / .ckpt) to an .npz that dmz_jax reads.

dmz_jax does not depend on torch; this script does (any CPU build is enough):

    python tools/torch_to_npz.py CHECKPOINT OUT.npz [--key state_dict] [--prefix unet.]

The checkpoint must be a state dict ({name: tensor}), as the authors' model / EMA checkpoints
(exlab-research/dmz, saved by guided_diffusion's TrainLoop) and diffusers'
diffusion_pytorch_model.bin are; `--key` picks a nested one ({"state_dict": {...}}).
Floating-point tensors are written as float32 (bfloat16 and float16 included), others as they
are. `--prefix` keeps only the names starting with it. Then, in dmz_jax:

    from dmz_jax.convert.diffusers import load_state_dict, diffdecoder_from_authors
    sd = load_state_dict("OUT.npz")

(.safetensors files need no conversion: load_state_dict reads them directly.)
"""

import argparse

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--key", default=None, help="the entry holding the state dict")
    parser.add_argument("--prefix", default="", help="keep only names starting with this")
    parser.add_argument("--unsafe", action="store_true",
                        help="torch.load(weights_only=False): unpickles arbitrary objects; "
                             "only for checkpoints you trust")
    args = parser.parse_args()
    obj = torch.load(args.checkpoint, map_location="cpu", weights_only=not args.unsafe)
    if args.key:
        obj = obj[args.key]
    if not isinstance(obj, dict):
        raise SystemExit(f"{args.checkpoint}: not a state dict but a {type(obj).__name__}")
    nested = [k for k, v in obj.items() if isinstance(v, dict)]
    if nested:
        raise SystemExit(f"{args.checkpoint}: entries {nested[:5]} are dicts; pick the state "
                         "dict with --key")
    arrays = {}
    for name, value in obj.items():
        if not name.startswith(args.prefix):
            continue
        if not torch.is_tensor(value):
            raise SystemExit(f"{name}: a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        arrays[name] = value.numpy()
    np.savez(args.out, **arrays)
    total = sum(a.size for a in arrays.values())
    print(f"wrote {len(arrays)} tensors ({total:,} numbers) to {args.out}")


if __name__ == "__main__":
    main()
