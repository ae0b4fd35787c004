"""A trained DMZ for notebooks and scripts.

    import dmz_jax
    m = dmz_jax.load("runs/fashion_mnist")          # newest checkpoint, EMA parameters
    z = m.encode(images)                             # [N, |z|] exact bits
    x = m.decode(z, steps=10)                        # z alone: x_T is fresh noise
    z, x_T = m.invert(images, steps=100)             # z and the deterministic DDIM x_T
    x = m.decode(z, x_T, steps=100)                  # near-exact reconstruction
    x = m.sample(64, steps=10, prior="bernoulli")    # generation: z ~ Bernoulli(0.5)

Images are float32 [N, H, W, C] in [-1, 1]. z is the semantic code (what the encoder keeps);
x_T is the "stochastic code": the noise the deterministic DDIM sampler starts from, which
holds what z leaves out (exact pixel positions, texture). Decoding z with a fresh x_T gives
an image with the same content but other details; with the x_T found by inversion, the
input itself.

Every function works in fixed-size batches split over the mesh (dmz_jax.inference builds
and caches the compiled functions: once per (function, K, sampler), shared by every Model
of the same network, `with_params` copies included). `load` restores only the parameters it
uses (EMA or raw, and the encoder's BatchNorm statistics), placed as the mesh says, and
once per checkpoint: a second `load` of a checkpoint while a Model of it is alive reuses its
parameters.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dmz_jax import checkpointing, inference, sharding
from dmz_jax.config_base import base_config
from dmz_jax.model import DMZ, create_model, image_shape, init_variables
from dmz_jax.train_state import make_diffusion

PRIORS = ("bernoulli", "empirical", "learned", "dataset")


class NoCheckpointError(FileNotFoundError):
    """The workdir holds no (such) checkpoint."""


def _config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """The saved JSON config on top of base_config() (lists back to tuples)."""
    config = base_config()
    flat = checkpointing.flatten_dict(saved)
    base = checkpointing.flatten_dict(config.to_dict())
    with config.unlocked():
        for key, value in flat.items():
            if key in base:
                config.update_from_flattened_dict(
                    {key: tuple(value) if isinstance(value, list) else value})
    return config


def _manager(workdir: str) -> ocp.CheckpointManager:
    path = checkpointing.checkpoint_dir(workdir)
    if not epath.Path(path).is_dir():
        raise NoCheckpointError(f"{workdir} has no checkpoints/ folder: train first, e.g. "
                                f"python -m dmz_jax.main --config=... --workdir={workdir}")
    return ocp.CheckpointManager(path, item_names=checkpointing.ITEMS)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of WORKDIR's saved checkpoints, oldest first."""
    with _manager(workdir) as manager:
        return sorted(manager.all_steps())


class _Restored:
    """The restored tree of one checkpoint ({"params" or "ema_params", "batch_stats"?}),
    held by the Models made from it (weakly referenced by `_RESTORED`)."""

    def __init__(self, tree: dict):
        self.tree = tree


# (step folder, its mtime, ema, network, mesh) -> the restored tree, while a Model holds it
_RESTORED: "weakref.WeakValueDictionary[tuple, _Restored]" = weakref.WeakValueDictionary()


def restore_target(config, model: DMZ, mesh, ema: bool = True) -> dict:
    """What `load` reads of a train state: {"ema_params" (or "params")} and, for an encoder
    with BatchNorm, {"batch_stats"}: shapes and dtypes placed as the mesh says (split over
    mesh.fsdp as in training). Never the optimizer moments, the step or the rng."""
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0),
                                                     image_shape(config)))
    placed = {k: checkpointing.placed(v, sharding.state_shardings(v, mesh))
              for k, v in abstract.items()}
    target = {"ema_params" if ema else "params": placed["params"]}
    if "batch_stats" in placed:
        target["batch_stats"] = placed["batch_stats"]
    return target


def _restore(manager: ocp.CheckpointManager, step: int, target: dict) -> dict:
    """The subtrees `target` of the state saved at `step`: a partial restore (orbax reads
    those arrays only)."""
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).state


def load(workdir: str, *, checkpoint: Optional[int] = None,
         config: Optional[ml_collections.ConfigDict] = None, ema: bool = True,
         mesh=None) -> "Model":
    """The model of WORKDIR's newest checkpoint (or step `checkpoint`).

    config: the config to run with (mode options such as sampling.*); its model, data
    geometry and diffusion must match the checkpoint's (else ConfigMismatchError). None: the
    checkpoint's own. ema: load the EMA parameters (default) or the raw ones. mesh: default
    config.mesh. Reads only the parameters it uses (`restore_target`), once per checkpoint.
    """
    with _manager(workdir) as manager:
        steps = manager.all_steps()
        step = max(steps, default=None) if checkpoint is None else checkpoint
        if step is None or step not in steps:
            raise NoCheckpointError(f"{workdir}: no checkpoint {step if step else ''} "
                                    f"(steps there: {sorted(steps)}); train first or pick "
                                    "one of those with --checkpoint")
        step_dir = epath.Path(manager.directory) / str(step)
        saved = checkpointing.read_config(step_dir)
        if config is None:
            config = _config_from_dict(saved)
        diff = checkpointing.config_diff(saved, config)
        if diff:
            raise checkpointing.ConfigMismatchError(
                f"{workdir} step {step} was trained with another model or config:\n"
                + "\n".join(diff) + "\nUse the config it was trained with.")
        model = create_model(config)
        mesh = mesh or sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
        key = (str(step_dir), step_dir.stat().mtime, ema, model, mesh)
        restored = _RESTORED.get(key)
        if restored is None:
            restored = _Restored(_restore(manager, step, restore_target(config, model, mesh,
                                                                        ema)))
            _RESTORED[key] = restored
            logging.info("Loaded %s step %d (%s parameters)", workdir, step,
                         "EMA" if ema else "raw")
    tree = restored.tree
    m = Model(config, model, make_diffusion(config), tree["ema_params" if ema else "params"],
              step, workdir, mesh, batch_stats=tree.get("batch_stats"))
    m._restored = restored  # keeps the tree known to `load` while this Model lives
    return m


class Model(inference.Inference):
    """A trained DMZ: encode, decode, invert, sample, interpolate, NLL (dmz_jax.inference),
    with the priors that need its workdir (empirical, dataset, learned).

    batch_stats: the encoder's BatchNorm running statistics (model.encoder.type conv_bn),
    used with the raw and the EMA parameters alike; None without BatchNorm.
    """

    def __init__(self, config, model: DMZ, diff, params, step: int, workdir: Optional[str],
                 mesh, batch_stats=None):
        super().__init__(config, model, diff, params, mesh, batch_stats)
        self.step, self.workdir = step, workdir
        self._reset()

    def _reset(self) -> None:
        self._training_codes = None

    # --- generation

    def prior_rows(self, prior: str, keys: np.ndarray) -> np.ndarray:
        """Codes [n, |z|], row j from `prior` with keys[j] alone: bernoulli (0.5 each; N(0, I)
        for the Gaussian latent), empirical (per-bit frequencies of the training codes; for
        the Gaussian latent a normal per dimension with the codes' mean and std), learned, or
        dataset (the code of a training image drawn at random, the authors' "dataset"
        sampler)."""
        keys = jnp.asarray(keys)
        dim = self.latent_dim
        if prior == "bernoulli":
            return super().prior_rows(prior, keys)
        if prior == "empirical":  # factorised: per-bit frequencies, or per-dimension normals
            codes = self.training_codes()
            mean = jnp.asarray(codes.mean(0))
            if self.model.latent_type == "binary":
                draw = lambda key: jax.random.bernoulli(key, mean, (dim,))  # noqa: E731
                return np.asarray(jax.vmap(draw)(keys), np.float32)
            std = jnp.asarray(codes.std(0))
            noise = jax.vmap(lambda key: jax.random.normal(key, (dim,)))(keys)
            return np.asarray(mean + std * noise, np.float32)
        if prior == "dataset":  # replay: the codes of random training images
            codes = self.training_codes()
            rows = jax.vmap(lambda key: jax.random.randint(key, (), 0, len(codes)))(keys)
            return codes[np.asarray(rows)]
        if prior == "learned":
            from dmz_jax import prior as prior_lib
            params, net = prior_lib.load_prior(self.prior_path)
            return np.asarray(prior_lib.sample_rows(params, net, keys))
        raise ValueError(f"unknown prior {prior!r}; use one of {PRIORS}")

    @property
    def prior_path(self) -> str:
        return str(epath.Path(self.workdir or ".") / "prior")

    def training_codes(self) -> np.ndarray:
        """Codes [N, |z|] of the first eval.probe_train_examples training images (computed
        once per Model)."""
        if self._training_codes is None:
            from dmz_jax import data
            images = data.load_split(self.config.data, "train",
                                     self.config.eval.probe_train_examples)["image"]
            self._training_codes = self.encode(images)
        return self._training_codes

    # --- interpolation

    def interpolate(self, a: np.ndarray, b: np.ndarray, n: int = 8, *, steps: int = 100,
                    path: str = "bits", x_T: str = "slerp") -> np.ndarray:
        """Frames [P, n, H, W, C] from images a [P, ...] to b [P, ...].

        path "bits": flip the bits where the codes differ, least confident first, in n - 1
        even portions; "tokens": mix the z-token embeddings (fractional z: the tokens are
        affine in z). x_T "slerp": spherical interpolation between the inverted x_T of a and
        b; "fixed": the inverted x_T of a throughout. Decoded by deterministic DDIM.
        """
        if path not in ("bits", "tokens") or x_T not in ("slerp", "fixed"):
            raise ValueError(f"path must be bits|tokens and x_T slerp|fixed, got {path}, {x_T}")
        za, xa = self.invert(a, steps=steps)
        zb, xb = self.invert(b, steps=steps)
        weights = np.linspace(0.0, 1.0, n)
        codes = (_bit_path(za, zb, self.encode_probabilities(a), n) if path == "bits"
                 else [(1 - w) * za + w * zb for w in weights])
        noises = [_slerp(xa, xb, w) if x_T == "slerp" else xa for w in weights]
        frames = [self.decode(z, x, steps=steps, method="ddim", eta=0.0)
                  for z, x in zip(codes, noises)]
        return np.stack(frames, axis=1)


def _bit_path(za: np.ndarray, zb: np.ndarray, pa: np.ndarray, n: int) -> list[np.ndarray]:
    """n codes from za to zb: the differing bits flipped least-confident first (|p - 0.5|)."""
    frames = []
    order = np.argsort(np.abs(pa - 0.5), axis=1)  # least confident first, per pair
    for k in range(n):
        z = za.copy()
        for row in range(len(za)):
            diff = [j for j in order[row] if za[row, j] != zb[row, j]]
            flip = diff[:int(round(k / (n - 1) * len(diff)))] if n > 1 else diff
            z[row, flip] = zb[row, flip]
        frames.append(z)
    return frames


def _slerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """Spherical interpolation per example between noises a and b [N, ...]."""
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cos = np.sum(fa * fb, 1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))[:, None]
    sin = np.maximum(np.sin(theta), 1e-8)
    out = (np.sin((1 - w) * theta) * fa + np.sin(w * theta) * fb) / sin
    return out.reshape(a.shape).astype(np.float32)
