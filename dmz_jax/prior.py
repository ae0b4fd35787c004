"""A learned autoregressive prior over DMZ's binary codes z in {0, 1}^n.

Generation with z ~ Bernoulli(0.5) assumes the encoder's codes are uniform; this prior instead
models p(z) = prod_i p(z_i | z_<i) with a small causal transformer (`BitPrior`), so that codes can
be sampled from (an estimate of) their true distribution and their entropy can be measured.

Conventions:
- Codes are [B, n] with values in {0, 1} (float or int); n = `BitPrior.num_bits`.
- Logits are natural log-odds [B, n]: logit i = log p(z_i = 1 | z_<i) - log p(z_i = 0 | z_<i).
- Likelihoods are in bits (log2) per code: Bernoulli(0.5) gives exactly n bits per code.
- `params` is the full flax variables dict returned by `model.init` ({'params': ...}).
- Checkpoints are a folder: `params/` (orbax StandardCheckpointer) and `model.json` (kwargs).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dmz_jax import checkpointing

_LOG2E = 1.0 / math.log(2.0)
_MODEL_JSON = "model.json"
_PARAMS_DIR = "params"


# --- Model

class Block(nn.Module):
    """Pre-LayerNorm transformer block: h [B, n, D] -> [B, n, D] under a causal mask.

    decode=True: h is one position [B, 1, D] and attention reads (and extends) the 'cache'
    collection of keys and values of the positions before it (flax's decode mode).
    """

    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    decode: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, mask: Optional[jax.Array], deterministic: bool) -> jax.Array:
        width = h.shape[-1]
        a = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dropout_rate=self.dropout,
            deterministic=deterministic, decode=self.decode)(nn.LayerNorm()(h), mask=mask)
        h = h + nn.Dropout(self.dropout)(a, deterministic=deterministic)
        m = nn.Dense(self.mlp_ratio * width)(nn.LayerNorm()(h))
        m = nn.Dense(width)(nn.gelu(m))
        return h + nn.Dropout(self.dropout)(m, deterministic=deterministic)


class BitPrior(nn.Module):
    """Causal transformer over bits: z [B, n] in {0, 1} -> logits [B, n] (log-odds, nats).

    The input is shifted right behind a learned start token, so logit i sees only z_<i.
    The output layer is zero-initialised: the untrained prior is exactly Bernoulli(0.5).

    decode=True (sampling; the same parameters): a call with z [B, n] only creates the
    'cache' collection; each call with z [B, 1] = bit i-1 (ignored for i = 0) then returns
    logit i [B, 1] and advances the cache by one position.
    """

    num_bits: int
    num_layers: int = 2
    width: int = 64
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    decode: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        batch, n = z.shape
        one_step = self.decode and n == 1
        if n != self.num_bits and not one_step:
            raise ValueError(f"BitPrior has num_bits={self.num_bits}, got codes of {n} bits")
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(2, self.width, embedding_init=init)(z.astype(jnp.int32))
        start = jnp.broadcast_to(self.param("start", init, (1, 1, self.width)),
                                 (batch, 1, self.width))
        pos = self.param("pos", init, (1, self.num_bits, self.width))
        if self.decode:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        if one_step:
            i = position.value
            h = jnp.where(i == 0, start, tokens) + jax.lax.dynamic_slice_in_dim(pos, i, 1, 1)
            position.value = i + 1
            mask = None  # the cache masks the positions not yet written
        else:
            h = jnp.concatenate([start, tokens[:, :-1]], axis=1) + pos
            mask = nn.make_causal_mask(jnp.zeros((batch, n)))  # [B, 1, n, n]
        for _ in range(self.num_layers):
            h = Block(self.num_heads, self.mlp_ratio, self.dropout,
                      self.decode)(h, mask, deterministic)
        h = nn.LayerNorm()(h)
        out = nn.Dense(1, kernel_init=nn.initializers.zeros, name="logits")(h)
        return out[..., 0]


def make_model(num_bits: int, model_kwargs: Optional[dict] = None) -> BitPrior:
    """A BitPrior of `num_bits` bits; model_kwargs are the other BitPrior fields."""
    kwargs = dict(model_kwargs or {})
    if kwargs.setdefault("num_bits", num_bits) != num_bits:
        raise ValueError(f"model_kwargs num_bits={kwargs['num_bits']} != codes' {num_bits}")
    return BitPrior(**kwargs)


@functools.partial(jax.jit, static_argnames=("model",))
def init_prior(model: BitPrior, rng: jax.Array) -> Any:
    """Variables {'params': ...} for `model`."""
    return model.init(rng, jnp.zeros((1, model.num_bits), jnp.float32))


# --- Likelihoods (bits)

@functools.partial(jax.jit, static_argnames=("model", "deterministic"))
def log_prob_bits(params: Any, model: BitPrior, z: jax.Array,
                  deterministic: bool = True, rngs: Optional[dict] = None) -> jax.Array:
    """log2 p(z) [B] for codes z [B, n] in {0, 1}; in bits (<= 0)."""
    z = jnp.asarray(z, jnp.float32)
    logits = model.apply(params, z, deterministic=deterministic, rngs=rngs)
    # log p(z_i) = -softplus(-s * logit), s = +1 for z_i = 1 and -1 for z_i = 0.
    nats = -jax.nn.softplus(jnp.where(z > 0.5, -logits, logits))
    return jnp.sum(nats * _LOG2E, axis=-1)


def bits_per_code(params: Any, model: BitPrior, codes: Any, batch_size: int = 4096) -> float:
    """Mean -log2 p(z) over codes [N, n] (bits per code); Bernoulli(0.5) gives exactly n."""
    codes = np.asarray(codes, np.float32)
    total = 0.0
    for i in range(0, len(codes), batch_size):
        total += float(jnp.sum(log_prob_bits(params, model, codes[i:i + batch_size])))
    return -total / len(codes)


def empirical_bits_per_code(train_codes: Any, test_codes: Any) -> float:
    """Bits per code on test_codes [M, n] of the factorised prior prod_i Bernoulli(p_i), with
    p_i the frequency of bit i in train_codes [N, n], clipped to [1e-3, 1 - 1e-3]."""
    p = np.clip(np.asarray(train_codes, np.float64).mean(axis=0), 1e-3, 1.0 - 1e-3)
    z = np.asarray(test_codes, np.float64)
    log2p = z * np.log2(p) + (1.0 - z) * np.log2(1.0 - p)
    return float(-log2p.sum(axis=1).mean())


def bernoulli_bits_per_code(n: int) -> float:
    """Bits per code of the fixed Bernoulli(0.5) prior over n bits: exactly n."""
    return float(n)


# --- Sampling

def _sample_bits(params: Any, model: BitPrior, num: int, logistic) -> jax.Array:
    """num codes [num, n], one position at a time: bit i is 1 where logistic(i) [num] (a
    Logistic(0, 1) draw) < logit_i, i.e. with probability sigmoid(logit_i). Keys and values of
    earlier positions are cached (model.clone(decode=True)), so bit i costs one position's
    forward."""
    decoder = model.clone(decode=True)
    cache = decoder.apply(params, jnp.zeros((num, model.num_bits)), mutable=["cache"])[1]

    def body(i, carry):
        z, cache = carry
        previous = jax.lax.dynamic_slice_in_dim(z, jnp.maximum(i - 1, 0), 1, axis=1)
        logit, cache = decoder.apply({**params, **cache}, previous, mutable=["cache"])
        bit = (logistic(i) < logit[:, 0]).astype(jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(z, bit[:, None], i, axis=1), cache

    z0 = jnp.zeros((num, model.num_bits), jnp.float32)
    return jax.lax.fori_loop(0, model.num_bits, body, (z0, cache))[0]


@functools.partial(jax.jit, static_argnames=("model", "num"))
def sample(params: Any, model: BitPrior, rng: jax.Array, num: int) -> jax.Array:
    """num codes [num, n] float32 in {0, 1} drawn from the prior (`_sample_bits`), the
    logistic noise of bit i from fold_in(rng, i)."""
    return _sample_bits(params, model, num,
                        lambda i: jax.random.logistic(jax.random.fold_in(rng, i), (num,)))


@functools.partial(jax.jit, static_argnames=("model",))
def sample_rows(params: Any, model: BitPrior, keys: jax.Array) -> jax.Array:
    """One code per key: keys [num, 2] -> codes [num, n] float32 in {0, 1}, row j drawn with
    keys[j] alone (bit i's noise from fold_in(keys[j], i)), so a row does not depend on the
    others (nor on how many are drawn at once)."""
    def noise(i):
        return jax.vmap(lambda key: jax.random.logistic(jax.random.fold_in(key, i), ()))(keys)
    return _sample_bits(params, model, keys.shape[0], noise)


# --- Training

def _optimizer(learning_rate: Any, steps: Any) -> optax.GradientTransformation:
    """AdamW, learning rate cosine-decayed over `steps` to 2% of it, weight decay 1e-4, and
    grad-norm clip 1. learning_rate and steps may be traced (one compile for all values)."""
    def schedule(count):
        frac = jnp.minimum(count / jnp.maximum(steps, 1), 1.0)
        return learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=1e-4))


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _train_step(params, opt_state, codes, rng, i, learning_rate, steps, *,
                model: BitPrior, batch_size: int):
    """One AdamW step on a minibatch of codes [N, n] drawn with replacement (rng folded with i);
    returns (params, opt_state, loss in bits per code)."""
    def loss_fn(p, z, dropout_rng):
        return -jnp.mean(log_prob_bits(p, model, z, deterministic=model.dropout == 0.0,
                                       rngs={"dropout": dropout_rng}))

    idx_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, i))
    idx = jax.random.randint(idx_rng, (batch_size,), 0, codes.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, codes[idx], dropout_rng)
    updates, opt_state = _optimizer(learning_rate, steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_prior(codes: Any, *, steps: int = 2000, batch_size: int = 256,
                learning_rate: float = 1e-3, seed: int = 0,
                model_kwargs: Optional[dict] = None) -> Any:
    """Fits a BitPrior to codes [N, n] in {0, 1} by maximum likelihood; returns its params.

    Minimises the mean bits per code with `_optimizer` (AdamW); deterministic in `seed`. The
    model is `make_model(n, model_kwargs)`.
    """
    codes = jnp.asarray(np.asarray(codes), jnp.float32)
    model = make_model(codes.shape[1], model_kwargs)
    init_rng, data_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_prior(model, init_rng)
    lr, total = jnp.float32(learning_rate), jnp.int32(steps)
    opt_state = _optimizer(lr, total).init(params)
    for i in range(steps):
        params, opt_state, _ = _train_step(params, opt_state, codes, data_rng, jnp.int32(i),
                                           lr, total, model=model, batch_size=batch_size)
    return params


def fit(train_codes: Any, test_codes: Any, *, steps: int, seed: int,
        model_kwargs: Optional[dict] = None) -> tuple[Any, dict]:
    """`train_prior` on train_codes [N, n], measured on test_codes [M, n]: (params, {
    learned_bits_per_code, empirical_bits_per_code, bernoulli_bits_per_code (= n),
    train_codes, test_codes}) (bits per code; what --mode=train_prior reports)."""
    params = train_prior(train_codes, steps=steps, seed=seed, model_kwargs=model_kwargs)
    n = int(np.shape(train_codes)[1])
    net = make_model(n, model_kwargs)
    return params, {
        "learned_bits_per_code": bits_per_code(params, net, test_codes),
        "empirical_bits_per_code": empirical_bits_per_code(train_codes, test_codes),
        "bernoulli_bits_per_code": bernoulli_bits_per_code(n),
        "train_codes": len(train_codes), "test_codes": len(test_codes)}


# --- Checkpoints

def save_prior(path: str, params: Any, model_kwargs: Optional[dict] = None) -> None:
    """Writes PATH/params (orbax) and PATH/model.json (BitPrior kwargs, num_bits filled in)."""
    path = checkpointing.absolute(path)
    path.mkdir(parents=True, exist_ok=True)
    num_bits = int(params["params"]["pos"].shape[1])
    kwargs = dict(model_kwargs or {}, num_bits=num_bits)
    make_model(num_bits, kwargs)  # validates the kwargs before anything is written
    checkpointing.save_replicas_whole_on_cpu()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / _PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    (path / _MODEL_JSON).write_text(json.dumps(kwargs, indent=2, sort_keys=True))


def load_prior(path: str) -> tuple[Any, BitPrior]:
    """(params, model) saved by `save_prior` at PATH; FileNotFoundError if there is none."""
    path = checkpointing.absolute(path)
    if not (path / _MODEL_JSON).exists() or not (path / _PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"no bit prior checkpoint at {path}; run --mode=train_prior first")
    kwargs = json.loads((path / _MODEL_JSON).read_text())
    model = make_model(kwargs["num_bits"], kwargs)
    target = jax.eval_shape(lambda: init_prior(model, jax.random.PRNGKey(0)))
    params = ocp.StandardCheckpointer().restore(path / _PARAMS_DIR, target)
    return params, model
