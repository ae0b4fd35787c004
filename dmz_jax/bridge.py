"""Image-to-image through a code bridge: the DMZ paper's Edges2Handbags experiment.

    python -m dmz_jax.main --config=TARGET_CONFIG --workdir=TARGET --mode=train_bridge \
        --config.modes.bridge.source_workdir=SOURCE
    python -m dmz_jax.main --config=TARGET_CONFIG --workdir=TARGET --mode=translate

Two DMZ models, one per domain (SOURCE: e.g. edge maps; TARGET: e.g. handbags), and a small
network mapping the source model's bits to the target model's bits (`Bridge`, the authors'
MappingNetwork): per hidden width, Dense -> BatchNorm -> ReLU, then Dense(|z_target|), trained
with binary cross-entropy on the target bits (Adam, shuffled minibatches, epochs). Translation:
encode a source image with the source model, map its bits (threshold 0.5), decode them with
the target model's ancestral sampler (K = modes.bridge.steps).

Paired data: row i of the source model's dataset split shows the same object as row i of the
target model's split (same split name, same length, equal `data.pairing_keys`).

Where we differ from the authors on purpose: they stop after 10 epochs without a better bit
accuracy on the *test* pairs and keep the last weights; we stop on a validation split carved
from the training pairs (modes.bridge.validation_fraction) and keep the best-validation
weights; the test pairs are scored once, at the end. Weights use flax's default
initialisation (LeCun normal, zero biases), not PyTorch's uniform one.

Conventions:
- Codes are float32 [N, |z|] in {0, 1}; logits [N, |z_target|] are natural log-odds of bit = 1.
- Bit accuracy: the share of (example, bit) entries where 1[logit > 0] equals the target bit;
  chance: the same for predicting each bit's majority value on the training pairs.
- The bridge is saved under TARGET/bridge (orbax CheckpointManager, one step = the best
  epoch): item "state" = {"params", "batch_stats"}, item "meta" = JSON (source workdir and
  step, |z_source|, |z_target|, options, validation accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax.training import train_state

from dmz_jax import checkpointing

BRIDGE_DIR = "bridge"  # under the target workdir
_ENCODE_CHUNK = 8192  # images decoded and encoded at a time: large splits never in memory
LPIPS_NOTE = ("LPIPS (the authors' metric, DDBM's) needs pretrained AlexNet/VGG weights, "
              "which cannot be fetched offline here: not computed")


# --- The network

class Bridge(nn.Module):
    """Source bits [B, n_in] -> target logits [B, num_out]: per width in `hidden`,
    Dense -> BatchNorm -> ReLU, then Dense(num_out). BatchNorm normalises with the batch's
    statistics when train=True (updating the 'batch_stats' running averages, momentum 0.9 =
    PyTorch's 0.1), with the running averages when train=False."""

    hidden: Sequence[int]
    num_out: int

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        h = jnp.asarray(z, jnp.float32)
        for width in self.hidden:
            h = nn.Dense(width)(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(h)
            h = nn.relu(h)
        return nn.Dense(self.num_out)(h)


class BridgeState(train_state.TrainState):
    """params, Adam's state and step (TrainState's), and BatchNorm's running statistics."""

    batch_stats: Any = None


def init_variables(model: Bridge, num_in: int, seed: int = 0) -> dict:
    """{'params', 'batch_stats'} of `model` for codes of num_in bits."""
    return jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(seed), jnp.zeros((2, num_in), jnp.float32))


@functools.partial(jax.jit, static_argnames="batch_size")
def train_epoch(state: BridgeState, x: jax.Array, y: jax.Array, rng: jax.Array, *,
                batch_size: int) -> tuple[BridgeState, jax.Array]:
    """One epoch: the rows of x [N, n_in], y [N, n_out] shuffled by rng, N // batch_size
    Adam steps of batch_size rows (the remainder waits for another epoch's order); returns
    the state and the mean training BCE (nats per bit)."""
    steps = x.shape[0] // batch_size
    order = jax.random.permutation(rng, x.shape[0])[:steps * batch_size]

    def step(state, idx):
        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x[idx], train=True,
                mutable=["batch_stats"])
            return optax.sigmoid_binary_cross_entropy(logits, y[idx]).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), loss

    state, losses = jax.lax.scan(step, state, order.reshape(steps, batch_size))
    return state, losses.mean()


@functools.partial(jax.jit, static_argnames="model")
def predict_logits(model: Bridge, variables: dict, z: jax.Array) -> jax.Array:
    """Logits [N, num_out] of codes z [N, n_in], BatchNorm on its running statistics (each
    row's output depends on that row alone)."""
    return model.apply(variables, z, train=False)


def map_bits(model: Bridge, variables: dict, z: np.ndarray) -> np.ndarray:
    """Target bits float32 [N, num_out] in {0, 1}: 1[p > 0.5] = 1[logit > 0]."""
    return (np.asarray(predict_logits(model, variables, np.asarray(z, np.float32))) > 0
            ).astype(np.float32)


def bit_accuracy(bits: np.ndarray, target: np.ndarray) -> float:
    """Share of the entries of bits [N, n] (0/1 or bool) equal to those of target [N, n]."""
    return float(np.mean((np.asarray(bits) > 0.5) == (np.asarray(target) > 0.5)))


def chance_accuracy(train_target: np.ndarray, target: np.ndarray) -> float:
    """Bit accuracy on target [M, n] of predicting each bit's majority value over
    train_target [N, n] (ties: 1)."""
    majority = (np.asarray(train_target).mean(0) >= 0.5).astype(np.float32)
    return bit_accuracy(np.broadcast_to(majority, np.shape(target)), target)


# --- Training

@dataclasses.dataclass
class FitResult:
    """The best-validation variables and the run's record.

    variables: {'params', 'batch_stats'} of the epoch with the best validation bit accuracy
    (the first such, when tied). history: per epoch, {'epoch' (1-based), 'train_loss',
    'val_loss' (BCE, nats per bit), 'val_accuracy'}. stopped_early: patience ran out before
    max_epochs.
    """

    variables: dict
    history: list
    best_epoch: int
    best_val_accuracy: float
    stopped_early: bool


def fit(model: Bridge, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
        learning_rate: float = 1e-3, batch_size: int = 256, max_epochs: int = 100,
        patience: int = 10, seed: int = 0) -> FitResult:
    """Trains `model` on codes x [N, n_in] -> y [N, num_out] (both in {0, 1}) with Adam on the
    BCE, batches of min(batch_size, N) rows; after each epoch scores x_val -> y_val and stops
    after `patience` epochs without a strictly better validation bit accuracy."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    x_val, y_val = jnp.asarray(x_val, jnp.float32), np.asarray(y_val, np.float32)
    if len(x) < 2 or len(x_val) < 1:
        raise ValueError(f"need >= 2 training and >= 1 validation pairs, got {len(x)}, "
                         f"{len(x_val)}")
    variables = init_variables(model, x.shape[1], seed)
    state = BridgeState.create(apply_fn=model.apply, params=variables["params"],
                               batch_stats=variables["batch_stats"],
                               tx=optax.adam(learning_rate))
    batch, rng = min(int(batch_size), len(x)), jax.random.PRNGKey(seed + 1)
    history, best, best_epoch, best_variables = [], -1.0, 0, None
    for epoch in range(1, max_epochs + 1):
        state, loss = train_epoch(state, x, y, jax.random.fold_in(rng, epoch), batch_size=batch)
        current = {"params": state.params, "batch_stats": state.batch_stats}
        logits = np.asarray(predict_logits(model, current, x_val))
        accuracy = bit_accuracy(logits > 0, y_val)
        history.append({"epoch": epoch, "train_loss": float(loss),
                        "val_loss": float(optax.sigmoid_binary_cross_entropy(logits, y_val).mean()),
                        "val_accuracy": accuracy})
        logging.info("bridge epoch %d: train BCE %.4f, validation bit accuracy %.4f", epoch,
                     float(loss), accuracy)
        if accuracy > best:
            best, best_epoch, best_variables = accuracy, epoch, current
        elif epoch - best_epoch >= patience:
            break
    return FitResult(best_variables, history, best_epoch, best,
                     stopped_early=len(history) < max_epochs)


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of n pairs: a seeded permutation, its first
    max(1, round(fraction n)) rows held out for validation."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# --- Checkpoints

def bridge_path(workdir: str) -> epath.Path:
    return checkpointing.absolute(workdir) / BRIDGE_DIR


def save_bridge(path, variables: dict, meta: dict) -> None:
    """Writes {'params', 'batch_stats'} and the JSON `meta` (which needs 'hidden', 'z_source',
    'z_target', 'best_epoch') as one orbax checkpoint at PATH (step = best epoch)."""
    checkpointing.save_replicas_whole_on_cpu()
    with ocp.CheckpointManager(checkpointing.absolute(path),
                               item_names=("state", "meta")) as manager:
        manager.save(int(meta["best_epoch"]), args=ocp.args.Composite(
            state=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


def load_meta(path) -> dict:
    """The JSON meta of the bridge at PATH; FileNotFoundError when there is none."""
    path = checkpointing.absolute(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no bridge at {path}")
    with ocp.CheckpointManager(path, item_names=("state", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no bridge checkpoint in {path}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def load_bridge(path) -> tuple[Bridge, dict, dict]:
    """(model, variables, meta) of the bridge saved at PATH."""
    meta = load_meta(path)
    model = Bridge(tuple(meta["hidden"]), int(meta["z_target"]))
    abstract = jax.eval_shape(lambda: init_variables(model, int(meta["z_source"])))
    with ocp.CheckpointManager(checkpointing.absolute(path),
                               item_names=("state", "meta")) as manager:
        variables = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    return model, variables, meta


# --- The modes

def _mode_error(message: str):
    from dmz_jax.modes import ModeError
    return ModeError(message)


def _same_place(a: str, b: str) -> bool:
    def canonical(p):
        p = str(checkpointing.absolute(p))
        return p.rstrip("/") if "://" in p else os.path.realpath(p)
    return canonical(a) == canonical(b)


def _check_train_options(config, workdir: str) -> None:
    """ModeError for unusable modes.bridge options or an existing bridge; reads no data."""
    o = config.modes.bridge
    if not o.source_workdir:
        raise _mode_error("modes.bridge.source_workdir is not set: train a DMZ on the source "
                          "domain first and pass --config.modes.bridge.source_workdir=ITS_WORKDIR")
    if _same_place(o.source_workdir, workdir):
        raise _mode_error(f"modes.bridge.source_workdir={o.source_workdir} is this (target) "
                          "workdir: the bridge maps another model's bits to this one's")
    if not 0.0 < o.validation_fraction < 1.0:
        raise _mode_error(f"modes.bridge.validation_fraction={o.validation_fraction}: must lie "
                          "in (0, 1) (the share of training pairs held out for early stopping)")
    counts = {"batch_size": (o.batch_size, 2), "max_epochs": (o.max_epochs, 1),
              "patience": (o.patience, 1)}
    for key, (value, least) in counts.items():
        if value < least:
            raise _mode_error(f"modes.bridge.{key}={value}: must be >= {least}")
    if not o.hidden or min(o.hidden) < 1:
        raise _mode_error(f"modes.bridge.hidden={tuple(o.hidden)}: widths must be >= 1")
    if o.train_examples == 0 or o.train_examples < -1:
        raise _mode_error(f"modes.bridge.train_examples={o.train_examples}: use -1 (all) or >= 1")
    if o.learning_rate <= 0:
        raise _mode_error(f"modes.bridge.learning_rate={o.learning_rate}: must be > 0")
    if bridge_path(workdir).exists():
        raise _mode_error(f"{bridge_path(workdir)} exists; move it away to train a new bridge")


def _load_source(path: str):
    """The source model at PATH with its own saved config; ModeError when there is none."""
    from dmz_jax import api
    try:
        return api.load(path)
    except api.NoCheckpointError as e:
        raise _mode_error(f"modes.bridge.source_workdir={path}: {e}") from e


def _check_binary(model, role: str) -> None:
    if not model.model.uses_latent or model.model.latent_type != "binary":
        raise _mode_error(f"the {role} model ({model.workdir}) has no binary code z "
                          f"(latent_type={model.model.latent_type!r}); the bridge maps bits")


def _data_name(data_cfg) -> str:
    if data_cfg.name == "image_folder":
        return f"image_folder {data_cfg.image_dir}"
    return data_cfg.name


def check_paired(source_cfg, target_cfg, split: str) -> int:
    """The size of `split`, after checking that row i of the source data (config.data)
    pairs with row i of the target data: same length and same `data.pairing_keys`.
    ModeError naming both datasets otherwise. Decodes no image."""
    from dmz_jax import data
    try:
        keys = [data.pairing_keys(c, split) for c in (source_cfg, target_cfg)]
    except ValueError as e:  # a split one of them does not have
        raise _mode_error(f"split {split!r}: {e}") from e
    names = f"source {_data_name(source_cfg)} and target {_data_name(target_cfg)}"
    if len(keys[0]) != len(keys[1]):
        raise _mode_error(f"unpaired data: the {split} split of the {names} holds "
                          f"{len(keys[0])} and {len(keys[1])} examples; the bridge needs row i "
                          "of one to show the same object as row i of the other")
    differ = np.flatnonzero(keys[0] != keys[1])
    if len(differ):
        raise _mode_error(f"unpaired data: the {split} splits of the {names} ({len(keys[0])} "
                          f"examples each) differ at {len(differ)} rows, first row {differ[0]}: "
                          f"{keys[0][differ[0]]!r} vs {keys[1][differ[0]]!r} (file names or "
                          "labels)")
    return len(keys[0])


def _codes(model, data_cfg, split: str, n: Optional[int]) -> np.ndarray:
    """Bits [n, |z|] of the first n (None: all) images of `split`, _ENCODE_CHUNK at a time."""
    from dmz_jax import data
    parts = [model.encode(b["image"]) for b in data.split_batches(data_cfg, split, n,
                                                                  _ENCODE_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, model.latent_dim), np.float32)


def _write_config(out: str, config, target, source) -> None:
    (epath.Path(out) / "config.json").write_text(json.dumps(
        {"checkpoint_step": target.step, "source_workdir": source.workdir,
         "source_step": source.step, "config": config.to_dict()}, indent=2, default=str))


def train_bridge_mode(config, workdir: str, checkpoint: Optional[int] = None) -> str:
    """--mode=train_bridge: fits the bridge from modes.bridge.source_workdir's bits to this
    model's bits on the first modes.bridge.train_examples pairs of the train split (a
    validation_fraction of them held out for early stopping); saves it to WORKDIR/bridge;
    writes metrics.json (bit accuracy on the validation pairs and on the first
    eval.probe_test_examples test pairs, chance, per-epoch history) to WORKDIR/train_bridge
    (or .1, ...). Returns that folder. Every refusal (ModeError) comes before any compile."""
    from dmz_jax import api, modes
    _check_train_options(config, workdir)
    o = config.modes.bridge
    source = _load_source(o.source_workdir)
    _check_binary(source, "source")
    available = check_paired(source.config.data, config.data, "train")
    check_paired(source.config.data, config.data, "test")
    n = available if o.train_examples == -1 else o.train_examples
    if n > available:
        raise _mode_error(f"modes.bridge.train_examples={n} > the {available} training pairs "
                          f"of {_data_name(config.data)}")
    fit_rows, val_rows = validation_split(n, o.validation_fraction, config.seed)
    if len(fit_rows) < 2:
        raise _mode_error(f"{n} training pairs leave {len(fit_rows)} to fit after the "
                          f"validation split ({o.validation_fraction}): use more pairs")
    target = api.load(workdir, checkpoint=checkpoint, config=config)
    _check_binary(target, "target")
    out = modes.output_dir(workdir, "train_bridge")
    _write_config(out, config, target, source)
    n_test = config.eval.probe_test_examples
    x, y = _codes(source, source.config.data, "train", n), _codes(target, config.data, "train", n)
    x_test = _codes(source, source.config.data, "test", n_test)
    y_test = _codes(target, config.data, "test", n_test)
    model = Bridge(tuple(o.hidden), target.latent_dim)
    result = fit(model, x[fit_rows], y[fit_rows], x[val_rows], y[val_rows],
                 learning_rate=o.learning_rate, batch_size=o.batch_size,
                 max_epochs=o.max_epochs, patience=o.patience, seed=config.seed)
    predicted = map_bits(model, result.variables, x_test)
    meta = {"source_workdir": str(checkpointing.absolute(source.workdir)),
            "source_step": int(source.step), "target_workdir": str(checkpointing.absolute(workdir)),
            "target_step": int(target.step), "z_source": int(source.latent_dim),
            "z_target": int(target.latent_dim), "hidden": [int(w) for w in o.hidden],
            "best_epoch": result.best_epoch, "val_bit_accuracy": result.best_val_accuracy,
            "options": o.to_dict(), "seed": int(config.seed)}
    save_bridge(bridge_path(workdir), result.variables, meta)
    modes._write_json(os.path.join(out, "metrics.json"), {
        "val_bit_accuracy": result.best_val_accuracy,
        "test_bit_accuracy": bit_accuracy(predicted, y_test),
        "test_exact_code_accuracy": float(np.mean(np.all(predicted == y_test, axis=1))),
        "chance_val_bit_accuracy": chance_accuracy(y[fit_rows], y[val_rows]),
        "chance_test_bit_accuracy": chance_accuracy(y[fit_rows], y_test),
        "chance": "predict each target bit's majority value over the fit pairs",
        "best_epoch": result.best_epoch, "epochs": len(result.history),
        "stopped_early": result.stopped_early, "history": result.history,
        "fit_pairs": len(fit_rows), "validation_pairs": len(val_rows),
        "test_pairs": len(y_test), "z_source": source.latent_dim, "z_target": target.latent_dim,
        "source_workdir": meta["source_workdir"], "source_step": source.step,
        "step": target.step, "saved_to": str(bridge_path(workdir))})
    return out


def _check_translate_options(config) -> None:
    o = config.modes.bridge
    for key in ("steps", "num_images", "translate_examples"):
        if o[key] < 1:
            raise _mode_error(f"modes.bridge.{key}={o[key]}: must be >= 1")


def _check_latent_dim(model, role: str, meta: dict, path) -> None:
    want = meta["z_source"] if role == "source" else meta["z_target"]
    if model.latent_dim != want:
        raise _mode_error(
            f"the {role} model ({model.workdir}) has |z|={model.latent_dim} but the bridge in "
            f"{path} maps |z_source|={meta['z_source']} -> |z_target|={meta['z_target']} "
            f"(trained against {meta['source_workdir']}); use the models it was trained with, "
            "or train a new bridge")


def _load_translation_models(config, workdir: str, checkpoint: Optional[int]):
    """(target, source, bridge model, variables, meta); ModeError when there is no bridge or
    the models' |z| are not the bridge's. Compiles nothing."""
    from dmz_jax import api
    _check_translate_options(config)
    path = bridge_path(workdir)
    try:
        meta = load_meta(path)
    except FileNotFoundError as e:
        raise _mode_error(f"{e}: run --mode=train_bridge on this workdir first") from e
    source_workdir = config.modes.bridge.source_workdir or meta["source_workdir"]
    if _same_place(source_workdir, workdir):
        raise _mode_error(f"the source workdir {source_workdir} is this (target) workdir")
    source = _load_source(source_workdir)
    _check_binary(source, "source")
    _check_latent_dim(source, "source", meta, path)
    target = api.load(workdir, checkpoint=checkpoint, config=config)
    _check_latent_dim(target, "target", meta, path)
    if source.step != meta["source_step"]:
        logging.warning("The source model is at step %d; the bridge was trained on its step %d",
                        source.step, meta["source_step"])
    model, variables, meta = load_bridge(path)
    return target, source, model, variables, meta


def to_domain(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Images [N, h, w, c] in [-1, 1] as [N, H, W, C] = shape: bilinear resize when the sizes
    differ, grey -> RGB by repetition, RGB -> grey by luma (0.299, 0.587, 0.114)."""
    height, width, channels = shape
    if x.shape[1:3] != (height, width):
        x = np.asarray(jax.image.resize(x, (len(x), height, width, x.shape[3]), "bilinear"))
    if x.shape[3] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=3)
    elif x.shape[3] == 3 and channels == 1:
        x = x @ np.array([[0.299], [0.587], [0.114]], np.float32)
    return x.astype(np.float32)


def frechet_metrics(config, translations: np.ndarray) -> dict:
    """FD of translations [N, H, W, C] against the first eval.fd_num_samples training images
    of config.data, in --mode=evaluate's feature network (evaluate.feature_network: Inception
    with eval.inception_weights, else a classifier trained here on the data's classes).

    The rule for when it is computed (no option): N >= 2 and a feature network exists; else
    {"fd": None, "fd_note": why}. Its cost beside the translations: the classifier's
    eval.classifier_steps training steps, and the features of N + fd_num_samples images.
    """
    from dmz_jax import data, evaluate
    from dmz_jax.metrics import frechet
    if len(translations) < 2:
        return {"fd": None, "fd_note": "fewer than 2 translations"}
    v = config.eval
    train = data.load_split(config.data, "train", max(v.fd_num_samples, v.probe_train_examples))
    try:
        test = data.load_split(config.data, "test", v.probe_test_examples)
        name, feature_fn, notes = evaluate.feature_network(config, train, test)
    except (ValueError, FileNotFoundError) as e:  # no classes, no Inception weights
        return {"fd": None, "fd_note": f"no feature network: {e}"}
    real = train["image"][:v.fd_num_samples]
    fd = frechet.frechet_distance(*frechet.feature_statistics(feature_fn(translations)),
                                  *frechet.feature_statistics(feature_fn(real)))
    return {"fid" if name == "inception" else "fd": fd, "fd_features": name,
            "fd_reference": f"{_data_name(config.data)} train split, first {len(real)}",
            "fd_num_translations": len(translations), **notes}


def translate_mode(config, workdir: str, checkpoint: Optional[int] = None) -> str:
    """--mode=translate: modes.bridge.translate_examples images of modes.split of the source
    data -> source bits -> bridge -> target bits -> target images (ancestral, K =
    modes.bridge.steps). Writes translations.npz (uint8), source_translation_target.png
    (rows: source / translation / paired target, modes.bridge.num_images columns) and
    metrics.json (MSE, PSNR, SSIM against the paired target images, FD, the bridge's bit
    accuracy on these pairs) into WORKDIR/translate (or .1, ...). Returns that folder."""
    from dmz_jax import data, images, modes
    o, split = config.modes.bridge, config.modes.split
    if o.source_dir and not epath.Path(o.source_dir).is_dir():
        raise _mode_error(f"modes.bridge.source_dir={o.source_dir!r} is not a folder; give a "
                          "folder of source-domain images, or unset it to translate modes.split")
    target, source, model, variables, meta = _load_translation_models(config, workdir, checkpoint)
    if o.source_dir:
        return _translate_folder(config, workdir, target, source, model, variables, meta)
    size = check_paired(source.config.data, config.data, split)
    n = min(o.translate_examples, size)
    if not n:
        raise _mode_error(f"split {split!r} of {_data_name(config.data)} is empty")
    out = modes.output_dir(workdir, "translate")
    _write_config(out, config, target, source)
    x_source = data.load_split(source.config.data, split, n)["image"]
    x_target = data.load_split(config.data, split, n)["image"]
    bits = map_bits(model, variables, source.encode(x_source))
    y = target.decode(bits, steps=o.steps, method="ancestral", seed=config.sampling.seed)
    modes._write_npz(os.path.join(out, "translations.npz"), translations=images.to_uint8(y),
                     bits=bits.astype(np.uint8))
    shown = min(o.num_images, n)
    modes._grid(os.path.join(out, "source_translation_target.png"),
                [to_domain(x_source[:shown], x_target.shape[1:]), y[:shown], x_target[:shown]])
    metrics = {**modes.reconstruction_metrics(x_target, y), "lpips": None,
               "lpips_note": LPIPS_NOTE,
               "code_bit_accuracy": bit_accuracy(bits, target.encode(x_target)),
               "code_bit_accuracy_note": "the mapped bits vs the target model's own bits of "
                                         "the paired target images",
               **frechet_metrics(config, y),
               "split": split, "num_translations": n, "steps": o.steps, "sampler": "ancestral",
               "step": target.step, "source_workdir": source.workdir,
               "source_step": source.step, "bridge_best_epoch": meta["best_epoch"],
               "z_source": meta["z_source"], "z_target": meta["z_target"]}
    modes._write_json(os.path.join(out, "metrics.json"), metrics)
    return out


def folder_data(data_cfg, folder: str):
    """A copy of data_cfg (the source model's geometry: size, channels, crop) reading every
    image of `folder` as its "train" split (data.name image_folder, no test split)."""
    import ml_collections
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.update(name="image_folder", image_dir=str(folder), test_fraction=0.0)
    return cfg


def _translate_folder(config, workdir, target, source, model, variables, meta) -> str:
    """--mode=translate with modes.bridge.source_dir: its first translate_examples images
    (unpaired, no ground truth) -> translations.npz, source_translation.png (rows: source /
    translation) and metrics.json (FD and counts; no paired metrics)."""
    from dmz_jax import data, images, modes
    o = config.modes.bridge
    x_source = data.load_split(folder_data(source.config.data, o.source_dir), "train",
                               o.translate_examples)["image"]
    if not len(x_source):
        raise _mode_error(f"modes.bridge.source_dir={o.source_dir!r} holds no readable image")
    out = modes.output_dir(workdir, "translate")
    _write_config(out, config, target, source)
    bits = map_bits(model, variables, source.encode(x_source))
    y = target.decode(bits, steps=o.steps, method="ancestral", seed=config.sampling.seed)
    modes._write_npz(os.path.join(out, "translations.npz"), translations=images.to_uint8(y),
                     bits=bits.astype(np.uint8))
    shown = min(o.num_images, len(y))
    modes._grid(os.path.join(out, "source_translation.png"),
                [to_domain(x_source[:shown], y.shape[1:]), y[:shown]])
    metrics = {"paired": False, "paired_note": "a folder of source images has no ground "
               "truth: no MSE/PSNR/SSIM", "source_dir": str(o.source_dir),
               **frechet_metrics(config, y), "num_translations": len(y), "steps": o.steps,
               "sampler": "ancestral", "step": target.step, "source_workdir": source.workdir,
               "source_step": source.step, "z_source": meta["z_source"],
               "z_target": meta["z_target"]}
    modes._write_json(os.path.join(out, "metrics.json"), metrics)
    return out
