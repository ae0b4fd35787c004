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

Every function works in fixed-size batches split over the mesh's data axis and compiles
once per (function, K, sampler).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dmz_jax import checkpointing, diffusion, samplers, sharding
from dmz_jax.config_base import base_config
from dmz_jax.model import DMZ, create_model, image_shape, variables
from dmz_jax.networks import latent as latent_lib
from dmz_jax.train_state import create_train_state, make_diffusion, make_optimizer

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
    return ocp.CheckpointManager(path, item_names=("state", "config"))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of WORKDIR's saved checkpoints, oldest first."""
    with _manager(workdir) as manager:
        return sorted(manager.all_steps())


def load(workdir: str, *, checkpoint: Optional[int] = None,
         config: Optional[ml_collections.ConfigDict] = None, ema: bool = True,
         mesh=None) -> "Model":
    """The model of WORKDIR's newest checkpoint (or step `checkpoint`).

    config: the config to run with (mode options such as sampling.*); its model, data
    geometry and diffusion must match the checkpoint's (else ConfigMismatchError). None: the
    checkpoint's own. ema: load the EMA parameters (default) or the raw ones.
    """
    with _manager(workdir) as manager:
        steps = manager.all_steps()
        step = max(steps, default=None) if checkpoint is None else checkpoint
        if step is None or step not in steps:
            raise NoCheckpointError(f"{workdir}: no checkpoint {step if step else ''} "
                                    f"(steps there: {sorted(steps)}); train first or pick "
                                    "one of those with --checkpoint")
        saved = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config
        if config is None:
            config = _config_from_dict(saved)
        diff = checkpointing.config_diff(saved, config)
        if diff:
            raise checkpointing.ConfigMismatchError(
                f"{workdir} step {step} was trained with another model or config:\n"
                + "\n".join(diff) + "\nUse the config it was trained with.")
        model, tx = create_model(config), make_optimizer(config.training)
        mesh = mesh or sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
        abstract = checkpointing.placed(
            jax.eval_shape(lambda: create_train_state(config, model, tx)),
            sharding.replicated(mesh))
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    logging.info("Loaded %s step %d (%s parameters)", workdir, step, "EMA" if ema else "raw")
    params = state.ema_params if ema else state.params
    return Model(config, model, make_diffusion(config), params, step, workdir, mesh,
                 batch_stats=state.batch_stats)


class Model:
    """A DMZ with its parameters: encode, decode, invert, sample, interpolate, NLL.

    batch_stats: the encoder's BatchNorm running statistics (model.encoder.type conv_bn),
    used with the raw and the EMA parameters alike; None without BatchNorm.
    """

    def __init__(self, config, model: DMZ, diff: diffusion.Diffusion, params, step: int,
                 workdir: Optional[str], mesh, batch_stats=None):
        self.config, self.model, self.diff, self.params = config, model, diff, params
        self.batch_stats = batch_stats
        self.step, self.workdir, self.mesh = step, workdir, mesh
        self.batch_size = config.sampling.batch_size
        if self.batch_size % mesh.size:
            raise ValueError(f"sampling.batch_size={self.batch_size} is not divisible by the "
                             f"{mesh.size} devices")

    def with_params(self, params, batch_stats=None) -> "Model":
        """The same model with other parameters (e.g. an untrained encoder) and, for an
        encoder with BatchNorm, their statistics (None: this model's)."""
        return Model(self.config, self.model, self.diff, params, self.step, self.workdir,
                     self.mesh, self.batch_stats if batch_stats is None else batch_stats)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    # --- batching

    def _map(self, fn, arrays: dict, rng: Optional[jax.Array] = None) -> np.ndarray:
        """fn(params, batch dict, rng) over batches of sampling.batch_size rows of `arrays`
        (the last one padded), each split over every device: one compile per fn, whatever
        the number of rows. Batch i + 1 is dispatched before batch i is copied back, so the
        devices never wait for the host."""
        n = len(next(iter(arrays.values())))
        out, in_flight, shard = [], [], sharding.batch_sharding(self.mesh)
        for i, start in enumerate(range(0, n, self.batch_size)):
            chunk = {}
            for key, value in arrays.items():
                part = np.asarray(value[start:start + self.batch_size], np.float32)
                pad = np.zeros((self.batch_size - len(part),) + part.shape[1:], np.float32)
                chunk[key] = jax.device_put(np.concatenate([part, pad]), shard)
            key = jax.random.fold_in(rng if rng is not None else jax.random.PRNGKey(0), i)
            in_flight.append((fn(self.params, chunk, key), min(self.batch_size, n - start)))
            if len(in_flight) == 2:
                result, rows = in_flight.pop(0)
                out.append(np.asarray(result)[:rows])
        out.extend(np.asarray(result)[:rows] for result, rows in in_flight)
        return np.concatenate(out)

    def _denoise_fn(self, params, z):
        def model_fn(x_t, model_t):
            return self.model.apply({"params": params}, x_t, model_t, z, method=DMZ.denoise)
        return model_fn

    # --- encoder

    @functools.cached_property
    def _encode_probs(self):
        def fn(params, batch, rng):
            del rng
            logits = self.model.apply(variables(params, self.batch_stats), batch["x"],
                                      method=DMZ.encode_logits)
            if self.model.latent_type == "binary":
                return jax.nn.sigmoid(logits)
            return logits
        return jax.jit(fn)

    def encode_probabilities(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, C] -> p(bit = 1) [N, |z|] (the Gaussian latent: its real code)."""
        self._needs_latent()
        return self._map(self._encode_probs, {"x": images})

    def encode(self, images: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """[N, H, W, C] -> z [N, |z|]: exact bits 1[p > 0.5] (the Gaussian latent: real).

        Gumbel-softmax bits with model.gumbel_eval="sample" (the authors' evaluation) are a
        draw b ~ Bernoulli(p) instead, from `seed` (default sampling.seed): the hard
        Gumbel-max sample of each bit's (off, on) pair has exactly that distribution.
        """
        p = self.encode_probabilities(images)
        if self.model.latent_type != "binary":
            return p
        if self.model.binary_estimator == "gumbel_softmax" and self.model.gumbel_eval == "sample":
            seed = self.config.sampling.seed if seed is None else seed
            return (np.random.default_rng(seed).random(p.shape) < p).astype(np.float32)
        return (p > 0.5).astype(np.float32)

    @functools.cached_property
    def _encode_soft(self):
        model = self.model

        def fn(params, batch, rng):
            logits = model.apply(variables(params, self.batch_stats), batch["x"],
                                 method=DMZ.encode_logits)
            if model.binary_estimator == "gumbel_softmax":
                return latent_lib.gumbel_softmax_bits(logits, rng, model.gumbel_temperature)
            return jax.nn.sigmoid(logits)
        return jax.jit(fn)

    def soft_bits(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """[N, H, W, C] -> soft bits [N, |z|] in (0, 1): what the authors' protocol reads
        (their `hidden`). Gumbel-softmax bits: one relaxed sample (from `seed`), the on-entry
        of each (off, on) pair; other binary estimators: p = sigmoid(logits)."""
        self._needs_latent()
        if self.model.latent_type != "binary":
            raise ValueError("soft bits need a binary latent (model.latent_type=binary)")
        return self._map(self._encode_soft, {"x": images}, jax.random.PRNGKey(seed))

    def soft_codes(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """The authors' soft code [N, 2|z|]: soft_bits as (off, on) pairs, interleaved."""
        return np.asarray(latent_lib.one_hot_pairs(self.soft_bits(images, seed)))

    def _needs_latent(self):
        if not self.model.uses_latent:
            raise ValueError("this model has no latent z (model.latent_type or "
                             "model.conditioning is 'none')")

    # --- decoder

    @functools.lru_cache(maxsize=None)
    def _decode_fn(self, steps: int, method: str, eta: float, with_x_T: bool, clip: bool):
        variance = self.config.diffusion.variance
        shape = (self.batch_size, *image_shape(self.config))

        def fn(params, batch, rng):
            z = batch.get("z")
            return samplers.sample(self.diff, self._denoise_fn(params, z), shape, rng,
                                   method=method, num_steps=steps, variance=variance,
                                   eta=eta, clip_denoised=clip,
                                   x_T=batch["x_T"] if with_x_T else None)
        return jax.jit(fn)

    def decode(self, z: Optional[np.ndarray], x_T: Optional[np.ndarray] = None, *,
               steps: Optional[int] = None, method: Optional[str] = None,
               eta: Optional[float] = None, seed: int = 0, num: Optional[int] = None,
               clip: Optional[bool] = None):
        """z [N, |z|] (and x_T [N, H, W, C]) -> images [N, H, W, C] with K = steps.

        x_T None: fresh noise from `seed`. method/eta default to config.sampling; with x_T from
        `invert`, use method="ddim", eta=0 for the deterministic reconstruction (both clip
        the predicted x0 as sampling.clip_denoised says, Diff-AE's choice). z None (a model
        without latent): `num` unconditional samples. clip: clip the predicted x0 to [-1, 1]
        (default sampling.clip_denoised).
        """
        s = self.config.sampling
        steps = int(steps or s.steps[0])
        method, eta = method or s.method, float(s.eta if eta is None else eta)
        arrays = {}
        if z is not None:
            arrays["z"] = z
        if x_T is not None:
            arrays["x_T"] = x_T
        if not arrays:
            arrays["n"] = np.zeros((num, 1))
        clip = s.clip_denoised if clip is None else clip
        fn = self._decode_fn(steps, method, eta, x_T is not None, bool(clip))
        return self._map(fn, arrays, jax.random.PRNGKey(seed))

    @functools.lru_cache(maxsize=None)
    def _invert_fn(self, steps: int):
        spaced = self.diff if steps == self.diff.num_timesteps else self.diff.respace(steps)

        def fn(params, batch, rng):
            del rng
            return samplers.ddim_invert(spaced, self._denoise_fn(params, batch.get("z")),
                                        batch["x"], variance=self.config.diffusion.variance,
                                        clip_denoised=self.config.sampling.clip_denoised)
        return jax.jit(fn)

    def invert(self, images: np.ndarray, *, steps: int = 100):
        """(z [N, |z|], x_T [N, H, W, C]): the code and the deterministic DDIM inversion of
        `images` with K = steps, so that decode(z, x_T, steps, method="ddim", eta=0) ~ images."""
        z = self.encode(images) if self.model.uses_latent else None
        arrays = {"x": images} if z is None else {"x": images, "z": z}
        return z, self._map(self._invert_fn(int(steps)), arrays)

    def reconstruct(self, images: np.ndarray, *, steps: int = 100, inverted: bool = True,
                    seed: int = 0) -> np.ndarray:
        """From z and the inverted x_T (inverted=True), or from z alone with fresh noise."""
        if inverted:
            z, x_T = self.invert(images, steps=steps)
            return self.decode(z, x_T, steps=steps, method="ddim", eta=0.0)
        return self.decode(self.encode(images), steps=steps, seed=seed)

    # --- generation

    def prior_sample(self, n: int, prior: str = "bernoulli", seed: int = 0) -> np.ndarray:
        """n codes [n, |z|] from `prior`: bernoulli (0.5 each; N(0, I) for the Gaussian
        latent), empirical (per-bit frequencies of the training codes; for the Gaussian latent
        a normal per dimension with the codes' mean and std), learned, or dataset
        (the codes of n training images drawn at random, the authors' "dataset" sampler)."""
        self._needs_latent()
        rng = jax.random.PRNGKey(seed)
        if prior == "bernoulli":
            kind = latent_lib.get_latent_type(self.model.latent_type)
            return np.asarray(kind.prior(rng, n, self.latent_dim))
        if prior == "empirical":  # factorised: per-bit frequencies, or per-dimension normals
            codes = self.training_codes()
            if self.model.latent_type == "binary":
                return np.asarray(jax.random.bernoulli(rng, codes.mean(0), (n, self.latent_dim)),
                                  np.float32)
            noise = jax.random.normal(rng, (n, self.latent_dim))
            return np.asarray(codes.mean(0) + codes.std(0) * noise, np.float32)
        if prior == "dataset":  # replay: the codes of n random training images
            codes = self.training_codes()
            return codes[np.random.default_rng(seed).integers(0, len(codes), n)]
        if prior == "learned":
            from dmz_jax import prior as prior_lib
            params, net = prior_lib.load_prior(self.prior_path)
            return np.asarray(prior_lib.sample(params, net, rng, n))
        raise ValueError(f"unknown prior {prior!r}; use one of {PRIORS}")

    @property
    def prior_path(self) -> str:
        return str(epath.Path(self.workdir or ".") / "prior")

    def sample(self, n: int, *, steps: Optional[int] = None, prior: str = "bernoulli",
               seed: int = 0, method: Optional[str] = None) -> np.ndarray:
        """n generated images [n, H, W, C]: z from `prior`, then K = steps of the sampler."""
        z = self.prior_sample(n, prior, seed) if self.model.uses_latent else None
        return self.decode(z, steps=steps, method=method, seed=seed + 1, num=n)

    @functools.lru_cache(maxsize=None)
    def training_codes(self) -> np.ndarray:
        """Codes [N, |z|] of the first eval.probe_train_examples training images."""
        from dmz_jax import data
        images = data.load_split(self.config.data, "train",
                                 self.config.eval.probe_train_examples)["image"]
        return self.encode(images)

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

    # --- likelihood

    @functools.cached_property
    def _nll_fn(self):
        def fn(params, batch, rng):
            return diffusion.nll_bpd(self.diff, self._denoise_fn(params, batch.get("z")),
                                     batch["x"], rng, variance=self.config.diffusion.variance)[
                                         "total_bpd"]
        return jax.jit(fn)

    def nll_bpd(self, images: np.ndarray, seed: int = 0,
                z: Optional[np.ndarray] = None) -> np.ndarray:
        """The full variational bound in bits/dim [N] (I-DDPM's), given z (default
        encode(x); the authors' protocol passes soft_bits(x))."""
        arrays = {"x": images}
        if self.model.uses_latent:
            arrays["z"] = self.encode(images) if z is None else z
        return self._map(self._nll_fn, arrays, jax.random.PRNGKey(seed))


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
