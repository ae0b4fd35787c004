"""The authors' DMZ weights (diffusers 0.32.0 U-Net, Conv-BN encoder) -> Flax, numpy only.

  load_state_dict(path)                      .npz / .safetensors -> {name: float32 array}
  unet_params_from_diffusers(sd, unet, image_shape[, strict=False, init_params=...])
                                             diffusers UNet2DConditionModel / UNet2DModel state
                                             dict -> DiffusersUNet params
  encoder_from_authors(sd, encoder[, image_shape])
                                             BernoulliEncoder state dict -> (params, batch_stats)
  diffdecoder_from_authors(sd, unet, encoder, image_shape)
                                             DiffDecoder state dict ("unet." / "encoder."
                                             prefixes) -> {"params": {"denoiser", "encoder"},
                                             "batch_stats": {"encoder"}}

Names: our parameter path is the diffusers name with list indices joined by "_" instead of "."
(down_blocks.0.resnets.1.conv1 <-> down_blocks_0/resnets_1/conv1), "weight" read as "kernel"
(conv, dense) or "scale" (norms), and our `cross_attn` submodules (norm2 + attn2 of each
transformer block) left out of the diffusers name. Layouts: conv OIHW -> HWIO, Linear
(out, in) -> (in, out); a 1x1 conv and a Linear are interchangeable (either stored shape is
accepted for the other). Every expected name and shape is checked before anything is
returned. Old diffusers attention names (query, key, value, proj_attn, as in the HF DDPM
checkpoints) are read as to_q, to_k, to_v, to_out.0.

Returned arrays are numpy float32 in nested dicts (flax accepts them as they are).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

# Containers that diffusers (torch.nn.ModuleList / Sequential) indexes with ".<i>".
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
               "upsamplers", "transformer_blocks", "to_out", "net", "layers")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
_GROUPING = ("cross_attn",)  # our submodules with no diffusers counterpart
_LEGACY_ATTENTION = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                     ("proj_attn", "to_out.0"))
_SHOW = 10  # names listed per kind of problem in an error


# ---------------------------------------------------------------------------------------------
# Reading checkpoints

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with epath.Path(path).open("rb") as f:  # local or gs://
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        header_len = int.from_bytes(raw, "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape, kind = tuple(info["shape"]), info["dtype"]
        buf = data[begin:end]
        if kind == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif kind in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_SAFETENSORS_DTYPES[kind]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, which this reader "
                             f"does not know (known: BF16, {', '.join(_SAFETENSORS_DTYPES)})")
        arr = arr.reshape(shape)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        out[name] = np.array(arr)  # own the memory, native byte order
    return out


def load_state_dict(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """A state dict as {name: array} (floating point as float32) from .npz or .safetensors.

    `prefix`: keep only names starting with it, with the prefix removed (e.g. "sd/" for the
    test fixtures). PyTorch pickles (.pt, .pth, .bin, .ckpt) need torch: convert them first
    with `python tools/torch_to_npz.py CHECKPOINT OUT.npz` (in an environment with torch)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
        sd = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
              for k, v in sd.items()}
    elif ext == ".safetensors":
        sd = _read_safetensors(path)
    elif ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise ValueError(
            f"{path}: a PyTorch pickle; reading it needs torch, which dmz_jax does not depend "
            "on. Convert it once, in an environment with torch: "
            f"python tools/torch_to_npz.py {path} {os.path.splitext(path)[0]}.npz")
    else:
        raise ValueError(f"{path}: unknown checkpoint format {ext!r} (expected .npz or "
                         ".safetensors; torch pickles via tools/torch_to_npz.py)")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# ---------------------------------------------------------------------------------------------
# Name and layout mapping


def torch_name(path: tuple[str, ...]) -> str:
    """Our parameter path (module names ..., leaf) -> the diffusers / PyTorch state-dict name."""
    parts = []
    for part in path[:-1]:
        if part in _GROUPING:
            continue
        m = _LIST_RE.match(part)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale") else leaf)
    return ".".join(parts)


def _to_flax(value: np.ndarray, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """A PyTorch tensor in our layout of `shape`, or None when it cannot be."""
    value = np.asarray(value)
    if value.ndim == 4 and len(shape) == 4:       # conv OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2 and len(shape) == 2:     # Linear (out, in) -> (in, out)
        value = value.T
    elif value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0].T               # 1x1 conv stored, Dense here
    elif value.ndim == 2 and len(shape) == 4 and shape[:2] == (1, 1):
        value = value.T[None, None]               # Linear stored, 1x1 conv here
    if tuple(value.shape) != tuple(shape):
        return None
    return np.ascontiguousarray(value, dtype=np.float32)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """How PyTorch stores a tensor of our `shape` (for messages)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def rename_legacy_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers attention names (query/key/value/proj_attn, e.g. google/ddpm-*) -> new."""
    out = {}
    for k, v in state_dict.items():
        for old, new in _LEGACY_ATTENTION:
            k = re.sub(r"(attentions\.\d+)\.%s\." % old, r"\1.%s." % new, k)
        out[k] = v
    return out


def _problems(missing, unexpected, mismatched) -> str:
    lines = []
    for title, items in (("missing (expected, not in the state dict)", missing),
                         ("unexpected (in the state dict, not expected)", unexpected),
                         ("shape mismatches (name: given vs expected, PyTorch layout)",
                          mismatched)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items[:_SHOW])
            if len(items) > _SHOW:
                lines.append(f"    ... and {len(items) - _SHOW} more")
    return "\n".join(lines)


def _convert(state_dict: Mapping[str, np.ndarray], shapes: Mapping[tuple, tuple],
             strict: bool, init: Optional[Mapping[tuple, Any]], layout: str):
    """Maps `state_dict` onto our flat {path: shape}; see unet_params_from_diffusers."""
    by_name = {torch_name(p): p for p in shapes}
    filled, missing, mismatched, rejected = {}, [], [], []
    for name, path in by_name.items():
        if name not in state_dict:
            missing.append(name)
            continue
        value = _to_flax(state_dict[name], shapes[path])
        if value is None:
            rejected.append(name)
            mismatched.append(f"{name}: {tuple(np.shape(state_dict[name]))} vs "
                              f"{_torch_shape(shapes[path])}")
        else:
            filled[path] = value
    unexpected = sorted(k for k in state_dict if k not in by_name)
    if strict:
        if missing or unexpected or mismatched:
            raise ValueError(f"the state dict does not match the expected layout, {layout}:\n"
                             + _problems(missing, unexpected, mismatched))
        return _unflatten(filled), None
    report = {"loaded": sorted(torch_name(p) for p in filled),
              "not_loaded": sorted(missing + rejected),
              "unexpected": unexpected, "shape_mismatch": mismatched}
    for path in shapes:
        if path not in filled:
            filled[path] = np.asarray(init[path], dtype=np.float32)
    return _unflatten(filled), report


# ---------------------------------------------------------------------------------------------
# The U-Net


def _unet_shapes(module, image_shape) -> dict[tuple, tuple]:
    import jax
    import jax.numpy as jnp
    h, w, c = tuple(image_shape)[-3:]
    args = [jax.ShapeDtypeStruct((1, h, w, c), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, module.cross_attention_dim), jnp.float32)]
    if module.class_embed != "none":
        args.append(jax.ShapeDtypeStruct((1, module.class_embed_input_dim), jnp.float32))
    # abstract evaluation only: nothing is compiled or allocated, the key included
    variables = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *args)
    return {p: tuple(v.shape) for p, v in _flatten(variables["params"]).items()}


def describe_layout(module, in_channels: Optional[int] = None) -> str:
    """The diffusers model that `module` (a DiffusersUNet) corresponds to, for messages."""
    n = len(module.block_out_channels)
    kinds = {None: "", "self": "Attn", "cross": "CrossAttn"}
    down = [f"{kinds[module.level_attention(i)]}DownBlock2D" for i in range(n)]
    up = [f"{kinds[module.level_attention(n - 1 - i)]}UpBlock2D" for i in range(n)]
    mid = {"cross_attention": "UNetMidBlock2DCrossAttn",
           "resnet": "UNetMidBlock2D via get_mid_block (one resnet)",
           "attention": "UNetMidBlock2D (resnet, attention, resnet)"}[module.mid_block]
    cls = ("UNet2DModel" if module.mid_block == "attention" and not module.cross_attention_levels
           else "UNet2DConditionModel")
    parts = [f"diffusers {cls}", f"in_channels={in_channels}" if in_channels else None,
             f"out_channels={module.out_channels}",
             f"block_out_channels={tuple(module.block_out_channels)}",
             f"layers_per_block={module.layers_per_block}", f"down_block_types={down}",
             f"up_block_types={up}", f"mid block {mid}",
             f"cross_attention_dim={module.cross_attention_dim}"
             if module.uses_cross_attention else None,
             f"class_embed_type='simple_projection' ({module.class_embed}, input dim "
             f"{module.class_embed_input_dim})" if module.class_embed != "none" else None,
             f"norm_num_groups={module.norm_num_groups}",
             f"resnet_time_scale_shift={module.resnet_time_scale_shift!r}"]
    return ", ".join(p for p in parts if p)


def unet_params_from_diffusers(state_dict: Mapping[str, np.ndarray], module, image_shape,
                               strict: bool = True, init_params: Optional[Mapping] = None):
    """A diffusers UNet2DConditionModel / UNet2DModel state dict -> params of `module`.

    Args:
      state_dict: {diffusers name: array in PyTorch layout} (see load_state_dict).
      module: the DiffusersUNet whose parameters to fill.
      image_shape: (H, W, C) of its input (C fixes conv_in's shape; a leading batch is ignored).
      strict: True: every name and shape must match, else ValueError (nothing is returned);
        returns the params. False (the authors' fine-tuning of an HF DDPM checkpoint with
        load_state_dict(strict=False)): fills the parameters whose name and shape match, keeps
        `init_params` for the others and returns (params, report), report = {"loaded",
        "not_loaded" (ours, left at init), "unexpected" (theirs, unused), "shape_mismatch"},
        names in diffusers' form.
      init_params: our initial params (a params tree or {"params": tree}); needed when not
        strict.
    """
    shapes = _unet_shapes(module, image_shape)
    layout = describe_layout(module, tuple(image_shape)[-1])
    sd = rename_legacy_attention(state_dict)
    init = None
    if not strict:
        if init_params is None:
            raise ValueError("strict=False needs init_params: the values kept for the "
                             "parameters the state dict does not fill")
        tree = init_params.get("params", init_params) if isinstance(init_params, Mapping) \
            else init_params
        init = _flatten(tree)
        absent = [torch_name(p) for p in shapes if p not in init]
        if absent:
            raise ValueError(f"init_params lack {len(absent)} parameters of the module, e.g. "
                             f"{absent[:_SHOW]}")
    params, report = _convert(sd, shapes, strict, init, layout)
    return params if strict else (params, report)


# ---------------------------------------------------------------------------------------------
# The encoder and the whole DiffDecoder


def _encoder_names(module, image_shape) -> dict[str, tuple[tuple, tuple]]:
    """{authors' name: (our path, our shape)}; None in a shape: not checked (no image_shape)."""
    out = {}
    if image_shape is None:
        prev, flat = None, None
    else:
        h, w, prev = tuple(image_shape)[-3:]
        for _ in module.widths:  # conv 3x3, stride 2, padding 1: ceil(size / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        flat = module.widths[-1] * h * w
    for i, width in enumerate(module.widths):
        out[f"layers.{i}.0.weight"] = (("params", f"layers_{i}", "conv", "kernel"),
                                       (3, 3, prev, width))
        out[f"layers.{i}.0.bias"] = (("params", f"layers_{i}", "conv", "bias"), (width,))
        for ours, theirs in (("scale", "weight"), ("bias", "bias")):
            out[f"layers.{i}.1.{theirs}"] = (("params", f"layers_{i}", "bn", ours), (width,))
        for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
            out[f"layers.{i}.1.{theirs}"] = (("batch_stats", f"layers_{i}", "bn", ours),
                                             (width,))
        prev = width
    out["proj.weight"] = (("params", "proj", "kernel"), (flat, 2 * module.latent_dim))
    out["proj.bias"] = (("params", "proj", "bias"), (2 * module.latent_dim,))
    return out


def encoder_from_authors(state_dict: Mapping[str, np.ndarray], module, image_shape=None):
    """The authors' BernoulliEncoder state dict (layers.{i}.0 conv, layers.{i}.1 BatchNorm2d,
    proj) -> (params, batch_stats) of a ConvBNEncoder. num_batches_tracked is accepted and
    unused (momentum 0.1 is fixed). `image_shape` (H, W, C) checks the first conv's input
    channels and the Linear's input width (C_last * H' * W', 4 C_last for the authors' 2x2
    final maps); without it those two dimensions are taken from the state dict."""
    names = _encoder_names(module, image_shape)
    layout = (f"the authors' Conv-BN encoder, widths {tuple(module.widths)}, latent_dim "
              f"{module.latent_dim}"
              + (f", image {tuple(image_shape)[-3:]}" if image_shape is not None else ""))
    filled, missing, mismatched = {}, [], []
    for name, (path, shape) in names.items():
        if name not in state_dict:
            missing.append(name)
            continue
        value = np.asarray(state_dict[name], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        ok = value.ndim == len(shape) and all(s is None or s == v
                                              for s, v in zip(shape, value.shape))
        if name == "proj.weight" and ok and value.shape[0] % module.widths[-1]:
            ok = False
        if not ok:
            expected = _torch_shape(tuple("?" if s is None else s for s in shape))
            mismatched.append(f"{name}: {tuple(np.shape(state_dict[name]))} vs {expected}")
        else:
            filled[path] = np.ascontiguousarray(value)
    unexpected = sorted(k for k in state_dict if k not in names
                        and not re.fullmatch(r"layers\.\d+\.1\.num_batches_tracked", k))
    if missing or unexpected or mismatched:
        raise ValueError(f"the state dict does not match the expected layout, {layout}:\n"
                         + _problems(missing, unexpected, mismatched))
    tree = _unflatten(filled)
    return tree["params"], tree["batch_stats"]


def diffdecoder_from_authors(state_dict: Mapping[str, np.ndarray], unet_module, encoder_module,
                             image_shape) -> dict:
    """The authors' DiffDecoder state dict ("unet.*" and "encoder.*") -> the DMZ variables
    {"params": {"denoiser": ..., "encoder": ...}, "batch_stats": {"encoder": ...}}."""
    unet = {k[5:]: v for k, v in state_dict.items() if k.startswith("unet.")}
    enc = {k[8:]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    other = sorted(k for k in state_dict if not k.startswith(("unet.", "encoder.")))
    if other:
        raise ValueError(f"a DiffDecoder state dict has only unet.* and encoder.* names; "
                         f"{len(other)} others: {other[:_SHOW]}")
    if not enc:
        raise ValueError("the state dict has no encoder.* names (a model trained without "
                         "an encoder, latent_dim 0?)")
    denoiser = unet_params_from_diffusers(unet, unet_module, image_shape)
    enc_params, enc_stats = encoder_from_authors(enc, encoder_module, image_shape)
    return {"params": {"denoiser": denoiser, "encoder": enc_params},
            "batch_stats": {"encoder": enc_stats}}
