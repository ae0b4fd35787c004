"""MINE (Belghazi et al. 2018): a lower bound on I(x_t; z) along DMZ's diffusion chain.

    python -m dmz_jax.main --config=configs/fashion_mnist.py --workdir=W \
        --mode=mutual_information --config.modes.mi.steps=1000

The estimator works on any arrays: a critic T(x, z) (`Critic`, an MLP on [x, z]) is trained to
maximise the Donsker-Varadhan bound

    I(x; z) >= E_p(x,z)[T] - log E_p(x)p(z)[exp T]            (nats)

with MINE's bias-corrected gradient: the gradient of log E[exp T] is that of E[exp T] divided by
a moving average of E[exp T] (rate `ema_rate` on the current batch) instead of by the batch's own
mean, which is biased.  In training the marginal pairs put each x beside the z of an
independently drawn training example.  The bound reported is evaluated on held-out pairs: the
joint term on the pairs themselves, the marginal term on `test_shifts` fixed derangements of
them, (x_p(i), z_p(i+k mod M)) for a fixed random permutation p and k = 1 .. test_shifts (no x
meets its own z, and test_shifts * M marginal pairs in all).  The same is reported on the
training pairs (train_bound_*; much larger than the test bound means the critic overfits).

Conventions:
- x [N, ...] (flattened to [N, D]) and z [N, L]; each array is standardised by one scalar mean and
  standard deviation of its training rows (an invertible map: the MI is unchanged).
- Bounds are in nats, and in bits where the key says `_bits` (nats / log 2).
- The mode (`run_mode`): z = the model's exact bits of real images; x_t at chain index t (0 ..
  T-1, diffusion.py's convention) of the forward chain (q_sample of the same images) and of the
  reverse chain (DMZ's ancestral sampler conditioned on those z).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from dmz_jax import data
from dmz_jax import diffusion as dfn

CHAINS = ("forward", "reverse")
TEST_SHIFTS = 8  # derangements of the held-out pairs in the bound's marginal term
_LOG2 = math.log(2.0)


# --- The estimator

class Critic(nn.Module):
    """T(x, z): x [B, D], z [B, L] -> [B] (nats); MLP([x, z] -> width -> width -> 1), ReLU."""

    width: int = 100

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        h = jnp.concatenate([x, z], axis=-1)
        h = nn.relu(nn.Dense(self.width)(h))
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(1)(h)[:, 0]


def log_mean_exp(values: jax.Array) -> jax.Array:
    """log mean exp(values) over all entries, a scalar (stable)."""
    return jax.nn.logsumexp(values) - jnp.log(values.size)


def dv_bound(t_joint: jax.Array, t_marginal: jax.Array) -> jax.Array:
    """The Donsker-Varadhan bound (nats, scalar): mean T on joint pairs [B] minus log mean
    exp T on marginal pairs [M]."""
    return jnp.mean(t_joint) - log_mean_exp(t_marginal)


def _mine_objective(t_joint: jax.Array, t_marginal: jax.Array, log_ema: jax.Array,
                    ema_rate: jax.Array):
    """(objective, new log_ema): the objective's value is dv_bound; its gradient is MINE's,
    grad E[T_joint] - grad E[exp T_marginal] / ema. ema = exp(new log_ema), held fixed, is the
    moving average of the batches' E[exp T_marginal], this batch's weighted ema_rate (as in
    mine-pytorch, updated before it divides); log_ema = -inf: no batch yet, ema = this one's."""
    lme = jax.lax.stop_gradient(log_mean_exp(t_marginal))
    log_ema = jnp.where(jnp.isneginf(log_ema), lme,
                        jnp.logaddexp(jnp.log1p(-ema_rate) + log_ema, jnp.log(ema_rate) + lme))
    surrogate = jnp.mean(jnp.exp(t_marginal - log_ema))
    marginal = jax.lax.stop_gradient(log_mean_exp(t_marginal) - surrogate) + surrogate
    return jnp.mean(t_joint) - marginal, log_ema


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """train [N, ...] and others flattened to [., D] float32, minus train's scalar mean, divided
    by its scalar standard deviation (1 when that is 0)."""
    flat = [np.asarray(a, np.float32).reshape(len(a), -1) for a in (train, *others)]
    mean, std = float(flat[0].mean()), float(flat[0].std())
    return [(a - mean) / (std if std > 0 else 1.0) for a in flat]


def _train_step(critic: Critic, tx, carry, rows, other, x, z, ema_rate):
    """One Adam step on the joint pairs (x[rows], z[rows]) and the marginal pairs
    (x[rows], z[other]), rows and other int [B]. carry = (params, opt_state, log_ema), log_ema
    the log of MINE's moving average of E[exp T] (-inf before the first step).
    Returns (carry, the minibatch objective in nats)."""
    params, opt_state, log_ema = carry
    xb = x[rows]

    def loss_fn(p):
        value, new_log_ema = _mine_objective(critic.apply(p, xb, z[rows]),
                                             critic.apply(p, xb, z[other]), log_ema, ema_rate)
        return -value, new_log_ema

    (loss, log_ema), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, log_ema), -loss


@functools.partial(jax.jit, static_argnames=("width", "batch_size"))
def _fit(x, z, key, steps, learning_rate, ema_rate, *, width: int, batch_size: int):
    """Trains a Critic(width) with Adam for `steps` steps (traced, like the rates: one compile
    per shapes) on pairs x [N, D], z [N, L]: step i takes the next batch_size rows of a random
    permutation of the pairs (a new one every pass over them) and, for the marginal pairs, the
    z of batch_size rows drawn at random. Returns (params, the mean minibatch objective of the
    last tenth of the steps, nats)."""
    critic, tx = Critic(width), optax.adam(learning_rate)
    init_key, pass_key, other_key = jax.random.split(key, 3)
    params = critic.init(init_key, x[:1], z[:1])
    n = x.shape[0]
    per_pass = n // batch_size
    tail = jnp.maximum(steps // 10, 1)

    def body(i, state):
        carry, order, total = state
        order = jax.lax.cond(
            i % per_pass == 0,
            lambda: jax.random.permutation(jax.random.fold_in(pass_key, i // per_pass), n),
            lambda: order)
        rows = jax.lax.dynamic_slice_in_dim(order, (i % per_pass) * batch_size, batch_size)
        other = jax.random.randint(jax.random.fold_in(other_key, i), (batch_size,), 0, n)
        carry, value = _train_step(critic, tx, carry, rows, other, x, z, ema_rate)
        return carry, order, total + jnp.where(i >= steps - tail, value, 0.0)

    carry = (params, tx.init(params), jnp.full((), -jnp.inf, jnp.float32))
    state = (carry, jnp.arange(n), jnp.zeros((), jnp.float32))
    carry, _, total = jax.lax.fori_loop(0, steps, body, state)
    return carry[0], total / tail


@functools.partial(jax.jit, static_argnames=("width", "shifts"))
def _held_out_bound(params, x, z, key, *, width: int, shifts: int):
    """dv_bound (nats) on pairs x [M, D], z [M, L]: joint = the pairs, marginal = the `shifts`
    derangements (x_p(i), z_p(i+k mod M)), k = 1 .. shifts, of a random permutation p."""
    critic = Critic(width)
    p = jax.random.permutation(key, x.shape[0])
    xp, zp = x[p], z[p]
    marginal = jnp.concatenate([critic.apply(params, xp, jnp.roll(zp, -k, axis=0))
                                for k in range(1, shifts + 1)])
    return dv_bound(critic.apply(params, x, z), marginal)


def train_critic(x: Any, z: Any, x_test: Any, z_test: Any, *, steps: int = 2000,
                 batch_size: int = 64, width: int = 100, learning_rate: float = 1e-4,
                 ema_rate: float = 0.01, seed: int = 0,
                 test_shifts: int = TEST_SHIFTS) -> dict:
    """MINE on training pairs x [N, ...], z [N, L]; the bound on held-out x_test [M, ...],
    z_test [M, L] (see the module docstring). Deterministic in `seed` (initialisation, batch
    order, marginal pairs). Returns floats: test_bound_nats / _bits (the estimate),
    train_bound_nats / _bits (the same on the training pairs, for overfitting), and
    last_minibatch_bound_nats (mean training objective of the last tenth of the steps)."""
    n, m = len(x), len(x_test)
    if len(z) != n or len(z_test) != m:
        raise ValueError(f"x and z need as many rows: {n} vs {len(z)}, {m} vs {len(z_test)}")
    if n < batch_size or m < 2 or steps < 1:
        raise ValueError(f"need batch_size={batch_size} <= training pairs ({n}), 2 <= held-out "
                         f"pairs ({m}) and steps >= 1 ({steps})")
    x, x_test = _standardise(x, x_test)
    z, z_test = _standardise(z, z_test)
    fit_key, test_key, train_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    params, last = _fit(x, z, fit_key, jnp.int32(steps), jnp.float32(learning_rate),
                        jnp.float32(ema_rate), width=width, batch_size=batch_size)
    k = min(m, n)  # the train bound on as many pairs as the test bound
    test = float(_held_out_bound(params, x_test, z_test, test_key, width=width,
                                 shifts=max(1, min(test_shifts, m - 1))))
    train = float(_held_out_bound(params, x[:k], z[:k], train_key, width=width,
                                  shifts=max(1, min(test_shifts, k - 1))))
    return {"test_bound_nats": test, "test_bound_bits": test / _LOG2,
            "train_bound_nats": train, "train_bound_bits": train / _LOG2,
            "last_minibatch_bound_nats": float(last)}


# --- The chains


def forward_timesteps(fractions, num_timesteps: int) -> list[int]:
    """Chain indices t = round(f (T - 1)), halves up, of the fractions f in [0, 1]: f = 0 is
    index 0, the least noisy state of q(x_t | x_0) (not x_0 itself), f = 1 is T - 1, almost
    pure noise."""
    return [int(math.floor(f * (num_timesteps - 1) + 0.5)) for f in fractions]


def reverse_indices(timesteps, spaced: dfn.Diffusion) -> list[int]:
    """For each original-chain index t, the index k of the respaced chain whose original
    timestep (spaced.timestep_map[k]) is nearest (ties: the smaller)."""
    kept = np.asarray(spaced.timestep_map.value)
    return [int(np.argmin(np.abs(kept - t))) for t in timesteps]


@functools.partial(jax.jit, static_argnames=("num",))
def _forward_states(diff: dfn.Diffusion, x0: jax.Array, t: jax.Array, key: jax.Array, *,
                    num: int):
    """q_sample of x0 [N, H, W, C] at index t (scalar int32), noise from `key`: [N, H, W, C]."""
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    return dfn.q_sample(diff, x0, jnp.full((num,), t, jnp.int32), noise)


def reverse_states(model, z: np.ndarray, steps: int, record, seed: int) -> np.ndarray:
    """States [S, N, H, W, C] of DMZ's ancestral chain (K = steps) conditioned on z [N, L]:
    the inputs x_k at the respaced indices `record` (S of them), N chains from `seed`; the
    chain model.decode(z, steps=steps, method="ancestral", seed=seed) runs
    (api.Model.reverse_chain)."""
    return model.reverse_chain(z, steps=steps, record=tuple(record), seed=seed,
                               method="ancestral")[1]


# --- The mode


def check_options(config) -> None:
    """ModeError, before anything is loaded, when config.modes.mi cannot run."""
    from dmz_jax.modes import ModeError
    o, m = config.modes.mi, config.model
    if m.latent_type == "none" or m.conditioning == "none":
        raise ModeError("mutual_information needs a model with a latent z (model.latent_type "
                        "and model.conditioning not 'none')")
    fractions = tuple(o.t_fractions)
    if not fractions or any(not 0.0 <= float(f) <= 1.0 for f in fractions):
        raise ModeError(f"modes.mi.t_fractions={fractions}: give one or more fractions t/T "
                        "in [0, 1], e.g. --config.modes.mi.t_fractions='(0.0,0.5,1.0)'")
    chains = tuple(o.chains)
    if not chains or any(c not in CHAINS for c in chains) or len(set(chains)) != len(chains):
        raise ModeError(f"modes.mi.chains={chains}: give one or both of {CHAINS}, each once")
    T = config.diffusion.num_timesteps
    if "reverse" in chains and not 1 <= o.reverse_steps <= T:
        raise ModeError(f"modes.mi.reverse_steps={o.reverse_steps}: use 1 .. {T} "
                        "(diffusion.num_timesteps)")
    if o.batch_size < 1 or o.train_examples < o.batch_size:
        raise ModeError(f"modes.mi.train_examples={o.train_examples} must be at least "
                        f"modes.mi.batch_size={o.batch_size} (>= 1)")
    if o.test_examples < 2:
        raise ModeError(f"modes.mi.test_examples={o.test_examples}: use 2 or more")
    if o.steps < 1 or o.seeds < 1 or o.width < 1 or o.learning_rate <= 0:
        raise ModeError("modes.mi.steps, seeds, width and learning_rate must be positive")
    if not 0.0 < o.ema_rate <= 1.0:
        raise ModeError(f"modes.mi.ema_rate={o.ema_rate}: use a rate in (0, 1]")


def _chain_states(model, chain: str, images: np.ndarray, z: np.ndarray, timesteps,
                  config, seed: int) -> tuple[np.ndarray, list[int]]:
    """(states [S, N, H, W, C], the chain index t of each) of `chain` at `timesteps`."""
    if chain == "forward":
        x0, key = jnp.asarray(images, jnp.float32), jax.random.PRNGKey(seed)
        states = [np.asarray(_forward_states(model.diff, x0, jnp.int32(t),
                                             jax.random.fold_in(key, t), num=len(images)))
                  for t in timesteps]
        return np.stack(states), list(timesteps)
    steps = int(config.modes.mi.reverse_steps)
    spaced = model.diff if steps == model.diff.num_timesteps else model.diff.respace(steps)
    record = reverse_indices(timesteps, spaced)
    unique = sorted(set(record))
    states = reverse_states(model, z, steps, unique, seed)
    kept = spaced.timestep_map.value
    return states[[unique.index(k) for k in record]], [int(kept[k]) for k in record]


def _summary(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def estimate_chain(model, config, chain: str, train: dict, test: dict) -> list[dict]:
    """One entry per t fraction: the t used, t/T, the test bound's mean/std over seeds (nats,
    bits) and per-seed values. train/test: {'image', 'z'}."""
    o, T = config.modes.mi, model.diff.num_timesteps
    fractions = [float(f) for f in o.t_fractions]
    wanted = forward_timesteps(fractions, T)
    seed = int(config.sampling.seed)
    x_train, t_used = _chain_states(model, chain, train["image"], train["z"], wanted, config,
                                    seed)
    x_test, _ = _chain_states(model, chain, test["image"], test["z"], wanted, config,
                              seed + 1_000_003)
    rows = []
    for f, t, xa, xb in zip(fractions, t_used, x_train, x_test):
        runs = [train_critic(xa, train["z"], xb, test["z"], steps=o.steps,
                             batch_size=o.batch_size, width=o.width,
                             learning_rate=o.learning_rate, ema_rate=o.ema_rate,
                             seed=int(config.seed) + s) for s in range(o.seeds)]
        nats = [r["test_bound_nats"] for r in runs]
        s = _summary(nats)
        rows.append({"t_fraction": f, "t": t, "t_over_T": t / T,
                     "mi_nats_mean": s["mean"], "mi_nats_std": s["std"],
                     "mi_bits_mean": s["mean"] / _LOG2, "mi_bits_std": s["std"] / _LOG2,
                     "mi_nats_per_seed": nats,
                     "train_bound_nats_per_seed": [r["train_bound_nats"] for r in runs]})
        logging.info("MI %s t=%d (t/T=%.3f): %.4f +- %.4f nats (train bound %.4f)", chain, t,
                     t / T, s["mean"], s["std"], float(np.mean(rows[-1][
                         "train_bound_nats_per_seed"])))
    return rows


def _plot(path: str, results: dict, ceiling_bits: float) -> bool:
    """mi_vs_t.png: MI (nats) against t/T, one line per chain with std error bars; False
    (logged) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no %s", path)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for chain, rows in results.items():
        ax.errorbar([r["t_over_T"] for r in rows], [r["mi_nats_mean"] for r in rows],
                    yerr=[r["mi_nats_std"] for r in rows], marker="o", capsize=3, label=chain)
    ax.set_xlabel("t / T")
    ax.set_ylabel("MINE bound on I(x_t; z) (nats, held-out)")
    ax.set_title(f"ceiling |z| log 2 = {ceiling_bits * _LOG2:.1f} nats")
    ax.axhline(0.0, color="gray", linewidth=0.5)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    epath.Path(path).write_bytes(buffer.getvalue())
    logging.info("Wrote %s", path)
    return True


def _plugin_entropy_bits(codes: np.ndarray) -> float:
    """Entropy (bits) of the empirical distribution of the rows of codes [N, L]: at most
    log2 N, so a lower estimate of H(z) whenever codes rarely repeat."""
    _, counts = np.unique(codes.astype(np.uint8), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def run_mode(config, workdir: str, checkpoint: Optional[int] = None) -> str:
    """--mode=mutual_information: MINE's held-out bound on I(x_t; z) for each chain in
    modes.mi.chains and t/T in modes.mi.t_fractions; writes metrics.json, mi_vs_t.png and
    mi.npz into W/mutual_information (or .1, .2, ...). Returns that folder."""
    from dmz_jax import modes
    check_options(config)
    o = config.modes.mi
    model, out = modes._start(config, workdir, checkpoint, "mutual_information")
    train = dict(image=data.load_split(config.data, "train", o.train_examples)["image"])
    test = dict(image=data.load_split(config.data, "test", o.test_examples)["image"])
    if len(train["image"]) < o.batch_size or len(test["image"]) < 2:
        raise modes.ModeError(f"{config.data.name} has {len(train['image'])} training and "
                              f"{len(test['image'])} test images: too few for batch_size "
                              f"{o.batch_size}; lower modes.mi.batch_size")
    train["z"], test["z"] = model.encode(train["image"]), model.encode(test["image"])
    results = {chain: estimate_chain(model, config, chain, train, test) for chain in o.chains}
    latent = model.latent_dim
    binary = config.model.latent_type == "binary"
    metrics = {
        "chains": results, "step": model.step, "num_timesteps": model.diff.num_timesteps,
        "latent_dim": latent, "train_examples": len(train["image"]),
        "test_examples": len(test["image"]),
        "ceiling_nats": latent * _LOG2 if binary else None,
        "ceiling_bits": float(latent) if binary else None,
        "distinct_codes_train": int(len(np.unique(train["z"], axis=0))),
        "distinct_codes_test": int(len(np.unique(test["z"], axis=0))),
        "plugin_entropy_bits_train": _plugin_entropy_bits(train["z"]) if binary else None,
        "estimator": "MINE, Donsker-Varadhan bound with the moving-average gradient; the "
                     f"value is the held-out (test split) bound: joint pairs vs {TEST_SHIFTS} "
                     "fixed derangements of them; std over seeds (ddof 1)",
        "t_convention": "t = round(t_fraction (T - 1)) (halves up), a chain index 0 .. T-1: "
                        "forward x_t = q_sample(x_0, t) (t = 0 is slightly noisy, not x_0); "
                        "reverse = the ancestral chain's input at the respaced step nearest t "
                        "(t is that step's original index); t_over_T = t / T",
        "options": o.to_dict(),
    }
    modes._write_json(os.path.join(out, "metrics.json"), metrics)
    modes._write_npz(os.path.join(out, "mi.npz"), **{
        f"{chain}_{key}": np.asarray([r[name] for r in rows])
        for chain, rows in results.items()
        for key, name in (("t", "t"), ("nats", "mi_nats_per_seed"))})
    _plot(os.path.join(out, "mi_vs_t.png"), results, float(latent))
    logging.info("I(x_t; z), held-out MINE bound in nats (mean +- std over %d seeds):\n%s",
                 o.seeds, table(results))
    return out


def table(results: dict) -> str:
    """A text table of `results` ({chain: estimate_chain rows}): t/T and mean +- std (nats)
    per chain, rows in the order of the t fractions."""
    chains = list(results)
    lines = ["t_fraction  " + "  ".join(f"{c + ' t/T':>10} {c + ' nats':>18}" for c in chains)]
    for i, row in enumerate(results[chains[0]]):
        cells = [f"{results[c][i]['t_over_T']:10.3f} "
                 f"{results[c][i]['mi_nats_mean']:9.3f} +- {results[c][i]['mi_nats_std']:5.3f}"
                 for c in chains]
        lines.append(f"{row['t_fraction']:10.3f}  " + "  ".join(cells))
    return "\n".join(lines)
