"""The one place that builds the jitted, sharded inference functions of a DMZ: encode,
decode (and so sample), invert, the NLL and the reverse chain with its states. Used by
dmz_jax.api.Model, the end of training (dmz_jax.evaluate from dmz_jax.train),
--mode=evaluate and experiments/ablations.py.

    m = inference.Inference(config, model, diff, params, mesh, batch_stats)
    z = m.encode(images)                   # [N, |z|] exact bits
    x = m.sample(64, steps=10, seed=0)     # [64, H, W, C], z ~ Bernoulli(0.5)

Compiling: each function is jitted once per `Spec` (the network, the mesh, the diffusion)
and static options (K, sampler, eta, clipping) and kept in a module-level cache, so a copy
with other parameters (`with_params`: the untrained encoder, the EMA parameters of a later
step) or another batch size reuses it; jax then compiles once per batch shape and parameter
tree. Nothing here holds parameters beyond the Inference objects themselves.

Sharding: the variables are placed as the train state places them (sharding.state_shardings:
split over mesh.fsdp, replicated when mesh.fsdp = 1), gathered once at the start of each
call; a batch is split over every device (sharding.batch_sharding) and so is the output.

Batching: rows go in fixed-size batches of `batch_size` (the last one padded), batch i + 1
dispatched before batch i is copied back (the devices never wait for the host).

Randomness: one key per call, PRNGKey(seed), split into a z part and a noise part, and one key
per row folded from those (`row_keys`), so row j of a result depends on (seed, j) alone, not
on batch_size nor on which call of a chunked loop made it (`first`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dmz_jax import diffusion, samplers, sharding
from dmz_jax.model import DMZ, image_shape, variables
from dmz_jax.networks import latent as latent_lib


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a compiled function depends on besides its arrays and static options: hashable,
    the key of the module-level cache (equal networks on equal meshes share functions)."""

    model: DMZ
    mesh: Mesh
    image_shape: tuple  # (H, W, C)
    schedule: str
    num_timesteps: int
    rescale_timesteps: bool
    variance: str  # diffusion.variance: how to read the model output

    @classmethod
    def of(cls, config, model: DMZ, mesh: Mesh) -> "Spec":
        d = config.diffusion
        return cls(model, mesh, tuple(image_shape(config)), d.schedule, int(d.num_timesteps),
                   bool(d.rescale_timesteps), d.variance)

    def diffusion(self, steps: Optional[int] = None) -> diffusion.Diffusion:
        """The chain, respaced to `steps` (None or T: the full chain)."""
        diff = diffusion.make_diffusion(self.schedule, self.num_timesteps,
                                        rescale_timesteps=self.rescale_timesteps)
        return diff if steps in (None, self.num_timesteps) else diff.respace(steps)


_COMPILED: dict[tuple, Callable] = {}  # (function name, Spec, static options) -> jitted


def _jitted(name: str, spec: Spec, options: tuple, build: Callable[[], Callable]) -> Callable:
    """jit(fn(variables, batch)) for (name, spec, options), built on first use: the variables
    gathered once (replicated) at the start, every output split over the batch axis."""
    key = (name, spec, options)
    if key not in _COMPILED:
        fn = build()
        replicated = sharding.replicated(spec.mesh)

        def gathered(variables_, batch):
            return fn(jax.lax.with_sharding_constraint(variables_, replicated), batch)

        _COMPILED[key] = jax.jit(gathered, out_shardings=sharding.batch_sharding(spec.mesh))
    return _COMPILED[key]


def _denoiser(model: DMZ, params, z: Optional[jax.Array]):
    """model_fn(x_t [B, H, W, C], model_t [B]) of the samplers, conditioned on z [B, |z|]."""
    def model_fn(x_t, model_t):
        return model.apply({"params": params}, x_t, model_t, z, method=DMZ.denoise)
    return model_fn


# --- the functions: fn(variables, batch) -> [B, ...]


def encode_fn(spec: Spec, kind: str) -> Callable:
    """kind "probabilities": batch {"x"} -> p(bit = 1) [B, |z|] (the Gaussian latent: its
    code); "soft": batch {"x", "key"} -> soft bits [B, |z|] (one relaxed Gumbel-softmax
    sample per row from its key; other estimators: sigmoid(logits))."""
    model = spec.model

    def build():
        def fn(variables_, batch):
            logits = model.apply(variables_, batch["x"], method=DMZ.encode_logits)
            if kind == "soft" and model.binary_estimator == "gumbel_softmax":
                return jax.vmap(lambda row, key: latent_lib.gumbel_softmax_bits(
                    row[None], key, model.gumbel_temperature)[0])(logits, batch["key"])
            if kind == "soft" or model.latent_type == "binary":
                return jax.nn.sigmoid(logits)
            return logits
        return fn
    return _jitted("encode", spec, (kind,), build)


def decode_fn(spec: Spec, steps: int, method: str, eta: float, with_x_T: bool, clip: bool,
              record: tuple = ()) -> Callable:
    """batch {"key" [B, 2], "z" [B, |z|] (absent without latent), "x_T" (with_x_T)} ->
    images [B, H, W, C] after K = steps of `method`; with `record` (indices of the K-step
    chain), (images, the chain's inputs x_k at those indices [B, S, H, W, C])."""
    def build():
        spaced = spec.diffusion(steps)

        def fn(variables_, batch):
            shape = (batch["key"].shape[0], *spec.image_shape)
            out = samplers.sample(spaced, _denoiser(spec.model, variables_["params"],
                                                    batch.get("z")),
                                  shape, batch["key"], method=method, num_steps=steps,
                                  variance=spec.variance, eta=eta, clip_denoised=clip,
                                  x_T=batch["x_T"] if with_x_T else None, record=record)
            return (out[0], jnp.moveaxis(out[1], 0, 1)) if record else out
        return fn
    return _jitted("decode", spec, (steps, method, eta, with_x_T, clip, record), build)


def invert_fn(spec: Spec, steps: int, clip: bool) -> Callable:
    """batch {"x", "z" (absent without latent)} -> the deterministic DDIM x_T [B, H, W, C]."""
    def build():
        spaced = spec.diffusion(steps)

        def fn(variables_, batch):
            return samplers.ddim_invert(spaced, _denoiser(spec.model, variables_["params"],
                                                          batch.get("z")),
                                        batch["x"], variance=spec.variance,
                                        clip_denoised=clip)
        return fn
    return _jitted("invert", spec, (steps, clip), build)


def nll_fn(spec: Spec) -> Callable:
    """batch {"x", "key", "z" (absent without latent)} -> the full variational bound [B] in
    bits/dim (diffusion.nll_bpd), each row's noise from its own key."""
    def build():
        diff = spec.diffusion()

        def fn(variables_, batch):
            def one(x, z, key):
                z = None if z is None else z[None]
                model_fn = _denoiser(spec.model, variables_["params"], z)
                return diffusion.nll_bpd(diff, model_fn, x[None], key,
                                         variance=spec.variance)["total_bpd"][0]
            return jax.vmap(one)(batch["x"], batch.get("z"), batch["key"])
        return fn
    return _jitted("nll", spec, (), build)


# --- host side


def row_keys(key: jax.Array, n: int, first: int = 0) -> np.ndarray:
    """Keys [n, 2] (uint32) of rows first .. first + n - 1: fold_in(key, row)."""
    rows = jnp.arange(first, first + n, dtype=jnp.uint32)
    return np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(key, rows))


def call_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The (z, noise) keys of one call with `seed`: PRNGKey(seed) split in two."""
    z_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
    return z_key, noise_key


def place(tree: Any, mesh: Mesh) -> Any:
    """`tree` (parameters or BatchNorm statistics; None passes) on `mesh` as the train state
    holds it (sharding.state_shardings: split over mesh.fsdp); no copy when it already is."""
    if tree is None:
        return None
    return jax.device_put(tree, sharding.state_shardings(tree, mesh))


def _to_global(part: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every process) as a global array split over `target`."""
    return jax.make_array_from_callback(part.shape, target, lambda index: part[index])


def _to_host(x: jax.Array) -> np.ndarray:
    """A global array on this host (gathered from the other processes when it must be)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _padded(value: Any, start: int, size: int) -> np.ndarray:
    """Rows start .. start + size - 1 of `value`, zero-padded to `size` rows (floats as
    float32, keys as they are)."""
    part = np.asarray(value[start:start + size])
    if np.issubdtype(part.dtype, np.floating) or part.dtype == bool:
        part = part.astype(np.float32)
    pad = np.zeros((size - len(part),) + part.shape[1:], part.dtype)
    return np.concatenate([part, pad])


def run_batches(fn: Callable, variables_: Any, arrays: dict, batch_size: int,
                mesh: Mesh) -> Any:
    """fn(variables, batch) over batches of batch_size rows of `arrays` ({name: [N, ...]}),
    the last one padded, each split over every device; batch i + 1 is dispatched before
    batch i is copied back. Returns fn's outputs' first N rows (numpy, fn's tree)."""
    n = len(next(iter(arrays.values())))
    target = sharding.batch_sharding(mesh)
    out, in_flight = [], []
    for start in range(0, n, batch_size):
        batch = {k: _to_global(_padded(v, start, batch_size), target) for k, v in arrays.items()}
        in_flight.append((fn(variables_, batch), min(batch_size, n - start)))
        if len(in_flight) == 2:
            result, rows = in_flight.pop(0)
            out.append(jax.tree.map(lambda a: _to_host(a)[:rows], result))
    out.extend(jax.tree.map(lambda a: _to_host(a)[:rows], result) for result, rows in in_flight)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


class Inference:
    """A DMZ with its parameters on a mesh: encode, decode, sample, invert, NLL, the reverse
    chain. Images are float32 [N, H, W, C] in [-1, 1]; z is [N, |z|].

    batch_stats: the encoder's BatchNorm statistics (model.encoder.type conv_bn), used with
    the raw and the EMA parameters alike; None without BatchNorm. batch_size: rows per
    compiled batch (default sampling.batch_size), a multiple of the mesh's devices.
    """

    def __init__(self, config, model: DMZ, diff: diffusion.Diffusion, params, mesh: Mesh,
                 batch_stats=None, batch_size: Optional[int] = None):
        self.config, self.model, self.diff, self.mesh = config, model, diff, mesh
        self.spec = Spec.of(config, model, mesh)
        self.params, self.batch_stats = place(params, mesh), place(batch_stats, mesh)
        self.batch_size = int(batch_size or config.sampling.batch_size)
        if self.batch_size % mesh.size:
            raise ValueError(f"batch size {self.batch_size} (sampling.batch_size) is not "
                             f"divisible by the {mesh.size} devices")

    # --- copies (they share every compiled function)

    def _copy(self, **changes) -> "Inference":
        new = copy.copy(self)
        new.__dict__.update(changes)
        new._reset()
        return new

    def _reset(self) -> None:
        """Clears what a copy must not share (a subclass's per-instance caches)."""

    def with_params(self, params, batch_stats=None) -> "Inference":
        """The same model with other parameters (e.g. an untrained encoder) and, for an
        encoder with BatchNorm, their statistics (None: this model's). No recompile."""
        stats = self.batch_stats if batch_stats is None else place(batch_stats, self.mesh)
        return self._copy(params=place(params, self.mesh), batch_stats=stats)

    def with_batch_size(self, batch_size: int) -> "Inference":
        """The same model run in batches of `batch_size` rows (results do not change)."""
        if batch_size % self.mesh.size:
            raise ValueError(f"batch size {batch_size} is not divisible by the "
                             f"{self.mesh.size} devices")
        return self._copy(batch_size=int(batch_size))

    @property
    def variables(self) -> dict:
        return variables(self.params, self.batch_stats)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def _run(self, fn: Callable, arrays: dict) -> Any:
        return run_batches(fn, self.variables, arrays, self.batch_size, self.mesh)

    def _needs_latent(self):
        if not self.model.uses_latent:
            raise ValueError("this model has no latent z (model.latent_type or "
                             "model.conditioning is 'none')")

    # --- encoder

    def encode_probabilities(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, C] -> p(bit = 1) [N, |z|] (the Gaussian latent: its real code)."""
        self._needs_latent()
        return self._run(encode_fn(self.spec, "probabilities"), {"x": images})

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

    def soft_bits(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """[N, H, W, C] -> soft bits [N, |z|] in (0, 1): what the authors' protocol reads
        (their `hidden`). Gumbel-softmax bits: one relaxed sample per image (from `seed` and
        its row), the on-entry of each (off, on) pair; other binary estimators: sigmoid."""
        self._needs_latent()
        if self.model.latent_type != "binary":
            raise ValueError("soft bits need a binary latent (model.latent_type=binary)")
        keys = row_keys(call_keys(seed)[1], len(images))
        return self._run(encode_fn(self.spec, "soft"), {"x": images, "key": keys})

    def soft_codes(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """The authors' soft code [N, 2|z|]: soft_bits as (off, on) pairs, interleaved."""
        return np.asarray(latent_lib.one_hot_pairs(self.soft_bits(images, seed)))

    # --- decoder

    def _decode_fn(self, steps: int, method: str, eta: float, with_x_T: bool, clip: bool,
                   record: tuple = ()) -> Callable:
        return decode_fn(self.spec, steps, method, eta, with_x_T, clip, record)

    def _decode_arrays(self, z, x_T, num, seed: int, first: int) -> dict:
        arrays = {}
        if z is not None:
            arrays["z"] = z
        if x_T is not None:
            arrays["x_T"] = x_T
        n = len(next(iter(arrays.values()))) if arrays else num
        arrays["key"] = row_keys(call_keys(seed)[1], n, first)
        return arrays

    def decode(self, z: Optional[np.ndarray], x_T: Optional[np.ndarray] = None, *,
               steps: Optional[int] = None, method: Optional[str] = None,
               eta: Optional[float] = None, seed: int = 0, num: Optional[int] = None,
               clip: Optional[bool] = None, first: int = 0) -> np.ndarray:
        """z [N, |z|] (and x_T [N, H, W, C]) -> images [N, H, W, C] with K = steps.

        x_T None: fresh noise, row j's from (seed, first + j). method/eta default to
        config.sampling; with x_T from `invert`, use method="ddim", eta=0 for the
        deterministic reconstruction (both clip the predicted x0 as sampling.clip_denoised
        says, Diff-AE's choice). z None (a model without latent): `num` unconditional
        samples. clip: clip the predicted x0 to [-1, 1] (default sampling.clip_denoised).
        """
        s = self.config.sampling
        steps = int(steps or s.steps[0])
        method, eta = method or s.method, float(s.eta if eta is None else eta)
        clip = bool(s.clip_denoised if clip is None else clip)
        fn = self._decode_fn(steps, method, eta, x_T is not None, clip)
        return self._run(fn, self._decode_arrays(z, x_T, num, seed, first))

    def reverse_chain(self, z: Optional[np.ndarray], *, steps: int, record, seed: int = 0,
                      method: Optional[str] = None, num: Optional[int] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's chain from fresh noise, conditioned on z [N, |z|] (K = steps):
        (images [N, H, W, C], states [S, N, H, W, C]), states[s] the input x_k of the
        respaced chain's index k = record[s] (0 .. K-1; K-1 is x_T). The same chain, with
        the same seed, as decode(z, steps=steps, method=method, seed=seed)."""
        s = self.config.sampling
        method = method or s.method
        fn = self._decode_fn(int(steps), method, float(s.eta), False, bool(s.clip_denoised),
                             tuple(int(k) for k in record))
        x0, states = self._run(fn, self._decode_arrays(z, None, num, seed, 0))
        return x0, np.moveaxis(states, 1, 0)

    def invert(self, images: np.ndarray, *, steps: int = 100):
        """(z [N, |z|], x_T [N, H, W, C]): the code and the deterministic DDIM inversion of
        `images` with K = steps, so that decode(z, x_T, steps, method="ddim", eta=0) ~ images."""
        z = self.encode(images) if self.model.uses_latent else None
        arrays = {"x": images} if z is None else {"x": images, "z": z}
        fn = invert_fn(self.spec, int(steps), bool(self.config.sampling.clip_denoised))
        return z, self._run(fn, arrays)

    def reconstruct(self, images: np.ndarray, *, steps: int = 100, inverted: bool = True,
                    seed: int = 0) -> np.ndarray:
        """From z and the inverted x_T (inverted=True), or from z alone with fresh noise."""
        if inverted:
            z, x_T = self.invert(images, steps=steps)
            return self.decode(z, x_T, steps=steps, method="ddim", eta=0.0)
        return self.decode(self.encode(images), steps=steps, seed=seed)

    # --- generation

    def prior_rows(self, prior: str, keys: np.ndarray) -> np.ndarray:
        """Codes [n, |z|], row j drawn from `prior` with keys[j] alone. Here only "bernoulli"
        (0.5 each; N(0, I) for the Gaussian latent); dmz_jax.api.Model adds the others."""
        if prior != "bernoulli":
            raise ValueError(f"prior {prior!r} needs a loaded model (dmz_jax.api.load)")
        kind = latent_lib.get_latent_type(self.model.latent_type)
        dim = self.latent_dim
        return np.asarray(jax.vmap(lambda key: kind.prior(key, 1, dim)[0])(jnp.asarray(keys)))

    def prior_sample(self, n: int, prior: str = "bernoulli", seed: int = 0,
                     first: int = 0) -> np.ndarray:
        """n codes [n, |z|] from `prior`, row j's from (seed, first + j)."""
        self._needs_latent()
        return self.prior_rows(prior, row_keys(call_keys(seed)[0], n, first))

    def sample(self, n: int, *, steps: Optional[int] = None, prior: str = "bernoulli",
               seed: int = 0, method: Optional[str] = None, first: int = 0) -> np.ndarray:
        """n generated images [n, H, W, C]: z from `prior`, then K = steps of the sampler.
        Image j is row first + j of the stream of `seed`: sample(10, first=0) and
        sample(5, first=5) give the same ten images, whatever the batch size."""
        z = self.prior_sample(n, prior, seed, first) if self.model.uses_latent else None
        return self.decode(z, steps=steps, method=method, seed=seed, num=n, first=first)

    # --- likelihood

    def nll_bpd(self, images: np.ndarray, seed: int = 0,
                z: Optional[np.ndarray] = None) -> np.ndarray:
        """The full variational bound in bits/dim [N] (I-DDPM's), given z (default
        encode(x); the authors' protocol passes soft_bits(x)); row j's noise from (seed, j)."""
        arrays = {"x": images, "key": row_keys(call_keys(seed)[1], len(images))}
        if self.model.uses_latent:
            arrays["z"] = self.encode(images) if z is None else z
        return self._run(nll_fn(self.spec), arrays)
