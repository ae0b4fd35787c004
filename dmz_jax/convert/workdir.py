"""A diffusers / the authors' weights file -> a workdir that training.init_from accepts.

    convert_to_workdir(config, weights_path, kind, workdir, strict) -> report

kind "unet": a diffusers UNet2DModel / UNet2DConditionModel state dict for the denoiser
(model.backbone=diffusers_unet); strict=False loads what fits by name and shape, as the
authors' load_state_dict(strict=False) of google/ddpm-ema-celebahq-256. kind "diffdecoder":
the authors' whole DiffDecoder ("unet.*", "encoder.*", BatchNorm running statistics too),
always strict. Every parameter the file does not fill keeps the initialisation of a new run
of `config` (config.seed: train_state.create_train_state).

Writes WORKDIR/checkpoints/0/ as training saves a step (checkpointing.save: items "state" and
"config"): the state a run of `config` starts from, params and ema_params both the converted
ones, plus "batch_stats" when the model has any; and WORKDIR/convert_report.json: "loaded"
and "unexpected" (the file's names), "not_loaded" and "shape_mismatch" (diffusers' names of
ours), "fresh" and "fresh_batch_stats" (our paths left at init), the file's sha256.
Refused before anything is compiled or written: a workdir holding checkpoints, a missing
file, a config that fails its checks, and a state dict that does not fit (strict: any
missing / unexpected / mismatched name; strict=False: a shape mismatch, as in PyTorch, or
nothing loaded).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from dmz_jax import checkpointing, config_checks
from dmz_jax.convert import diffusers as dconv
from dmz_jax.metrics.inception import file_sha256
from dmz_jax.model import create_model, image_shape
from dmz_jax.networks.conv_bn import ConvBNEncoder
from dmz_jax.train_state import copy_tree, create_train_state, make_optimizer

KINDS = ("unet", "diffdecoder")
REPORT = "convert_report.json"


def _abstract_variables(model, shape) -> dict:
    """{"params": ..., "batch_stats"?: ...} as shapes (abstract evaluation: nothing compiled)."""
    x, t = jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, x, t), x, t)


def _unet_variables(sd, model, shape, strict: bool, abstract) -> tuple[dict, dict]:
    denoiser = model.denoiser
    if strict:
        params = dconv.unet_params_from_diffusers(sd, denoiser, shape)
        loaded = sorted(dconv.torch_name(p) for p in traverse_util.flatten_dict(params))
        report = {"loaded": loaded, "not_loaded": [], "unexpected": [], "shape_mismatch": []}
    else:  # zero-stride stand-ins for the init values: the fresh ones are merged in later
        stand_in = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape),
                                abstract["params"]["denoiser"])
        params, report = dconv.unet_params_from_diffusers(sd, denoiser, shape, strict=False,
                                                          init_params=stand_in)
        layout = dconv.describe_layout(denoiser, shape[-1])
        if report["shape_mismatch"]:  # torch's load_state_dict(strict=False) raises too
            raise ValueError(f"{len(report['shape_mismatch'])} tensor(s) of the state dict "
                             f"have other shapes than the model ({layout}):\n  "
                             + "\n  ".join(report["shape_mismatch"][:10]))
        if not report["loaded"]:
            raise ValueError(f"no tensor of the state dict fits the model ({layout}); "
                             f"its names: {sorted(sd)[:10]}")
        keep = set(report["loaded"])
        params = {p: v for p, v in traverse_util.flatten_dict(params).items()
                  if dconv.torch_name(p) in keep}
        params = traverse_util.unflatten_dict(params)
    return {"params": {"denoiser": params}}, report


def _diffdecoder_variables(sd, model, shape, abstract) -> tuple[dict, dict]:
    if not isinstance(model.encoder, ConvBNEncoder):
        raise ValueError("--kind=diffdecoder needs the authors' encoder "
                         "(model.encoder.type=conv_bn)")
    extra = sorted(set(abstract["params"]) - {"denoiser", "encoder"})
    if extra:
        raise ValueError(f"the model has parameters a DiffDecoder does not: {extra} (the "
                         "authors' model has model.z_tokens=one_hot_single)")
    variables = dconv.diffdecoder_from_authors(sd, model.denoiser, model.encoder, shape)
    loaded = sorted(f"unet.{dconv.torch_name(p)}" for p in
                    traverse_util.flatten_dict(variables["params"]["denoiser"]))
    unused = sorted(k for k in sd if k.endswith(".num_batches_tracked"))  # accepted, unused
    loaded += sorted(k for k in sd if k.startswith("encoder.") and k not in unused)
    return variables, {"loaded": loaded, "not_loaded": [], "unexpected": unused,
                       "shape_mismatch": []}


def _merge(fresh: Any, converted: dict, collection: str) -> tuple[dict, list[str]]:
    """`fresh` (arrays, or shapes where the file fills everything) with the leaves of
    `converted` put in, shapes checked; and the paths left fresh."""
    flat = traverse_util.flatten_dict(fresh)
    new = traverse_util.flatten_dict(converted)
    for path, value in new.items():
        if path not in flat or tuple(flat[path].shape) != tuple(value.shape):
            raise ValueError(f"{collection}/{'/'.join(path)}: the converted {value.shape} does "
                             "not fit the model")  # a converter bug, not the user's
        flat[path] = np.asarray(value, np.float32)
    left = sorted(p for p in flat if p not in new)
    if any(isinstance(flat[p], jax.ShapeDtypeStruct) for p in left):
        raise ValueError(f"{collection}: the file does not fill {['/'.join(p) for p in left]}")
    return jax.device_put(traverse_util.unflatten_dict(flat)), ["/".join(p) for p in left]


def _fields(state, drop=()) -> dict:
    """{name: value} of the train state's fields (those its pytree has), less `drop`."""
    children = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda n: n is not state)[0]
    names = [getattr(path[0], "name", str(path[0])) for path, _ in children]
    return {n: leaf for n, (_, leaf) in zip(names, children) if n not in drop}


def _fresh_state(config, model, with_params: bool) -> dict:
    """The train state a run of `config` starts from, as {field: value}; without params and
    ema_params unless `with_params` (XLA then drops their initialisation)."""
    init = functools.partial(create_train_state, config, model, make_optimizer(config.training))
    if with_params:  # the function a training run compiles: one compile for both (the cache)
        return _fields(jax.jit(init)())
    return jax.jit(lambda: _fields(init(), drop=("params", "ema_params")))()


def convert_to_workdir(config: ml_collections.ConfigDict, weights_path: str, kind: str,
                       workdir: str, strict: bool = True) -> dict:
    """Converts `weights_path` into WORKDIR/checkpoints/0 for training.init_from=WORKDIR;
    returns the report also written to WORKDIR/convert_report.json. See the module doc."""
    steps = [p.name for p in epath.Path(checkpointing.checkpoint_dir(workdir)).glob("*")
             if p.name.isdigit()]
    if steps:
        raise FileExistsError(f"{workdir} already holds checkpoints (steps {sorted(steps)}): "
                              "convert into a new --workdir.")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {KINDS}")
    if kind == "diffdecoder" and not strict:
        raise ValueError("--strict=false applies to --kind=unet: a DiffDecoder is converted "
                         "whole")
    if not epath.Path(weights_path).is_file():
        raise FileNotFoundError(f"no weights file {weights_path}")
    config_checks.check_config(config)
    model = create_model(config)
    if not model.diffusers_backbone:
        raise ValueError("converting diffusers weights needs model.backbone=diffusers_unet")
    shape = image_shape(config)
    sd = dconv.load_state_dict(weights_path)
    abstract = _abstract_variables(model, shape)
    if kind == "unet":
        converted, report = _unet_variables(sd, model, shape, strict, abstract)
    else:
        converted, report = _diffdecoder_variables(sd, model, shape, abstract)

    # everything is checked: compile the initialisation, then write
    state = _fresh_state(config, model, with_params=kind == "unet")
    params, fresh = _merge(state.get("params", abstract["params"]), converted["params"],
                           "params")
    state.update(params=params, ema_params=jax.jit(copy_tree)(params))
    if state.get("batch_stats"):  # the model's BatchNorm statistics (TrainState.batch_stats)
        state["batch_stats"], report["fresh_batch_stats"] = _merge(
            state["batch_stats"], converted.get("batch_stats", {}), "batch_stats")
    as_in_file = dict(zip(dconv.rename_legacy_attention(sd), sd))  # old attention names
    for key in ("loaded", "unexpected"):
        report[key] = sorted(as_in_file.get(name, name) for name in report[key])
    sizes = {p: int(np.prod(v.shape))
             for p, v in traverse_util.flatten_dict(params, sep="/").items()}
    report.update(weights=str(checkpointing.absolute(weights_path)),
                  sha256=file_sha256(weights_path),
                  kind=kind, strict=strict, seed=config.seed, fresh=fresh,
                  loaded_parameters=sum(sizes.values()) - sum(sizes.get(p, 0) for p in fresh),
                  fresh_parameters=sum(sizes.get(p, 0) for p in fresh))
    manager = checkpointing.create_manager(workdir, config.training.keep_checkpoints)
    checkpointing.save(manager, 0, state, config)
    manager.wait_until_finished()
    manager.close()
    (epath.Path(workdir) / REPORT).write_text(json.dumps(report, indent=1))
    return report
