"""Gaussian diffusion with I-DDPM semantics (schedules, respacing, posterior, losses, VLB).

Conventions:
- Images are NHWC float32 in [-1, 1], written [B, H, W, C] (any [B, ..., C] works).
- `t` is an int32 [B] index into this diffusion's own chain (0 .. T-1, T = diff.num_timesteps,
  the kept steps after respacing). The network is fed `diff.model_timesteps[t]` (float32 [B]),
  the original chain's timestep, times 1000 / T_original with `rescale_timesteps` (I-DDPM's
  `_WrappedModel`).
- `model_fn(x_t [B,H,W,C], model_t [B]) -> [B,H,W,2C]` (eps, v) with the learned variance
  (variance="learned_range"), else [B,H,W,C]; conditioning (DMZ's z) is closed over by the
  caller.
- `variance` (one of VARIANCES) is I-DDPM's ModelVarType: "learned_range" (the network's v
  interpolates log beta~_t .. log beta_t; hybrid loss), "fixed_small" (beta~_t, the
  posterior variance, its log clipped at t = 0) or "fixed_large" (append(beta~_1, beta_{1:}));
  the fixed ones train with the MSE alone.
- Log-likelihoods are in nats unless the name says "bpd" (bits per dimension).
Schedule constants are computed in float64 numpy and stored as float32; the float64 betas are
kept as a static (hashable) field so that respacing is exact.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULES = ("cosine", "linear")
VARIANCES = ("learned_range", "fixed_small", "fixed_large")


def _check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


# --- Schedules and respacing (float64 numpy)

def cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    """I-DDPM cosine abar(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T in [0, 1]."""
    return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule, float64 [T]: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
    betas = [min(1.0 - cosine_alpha_bar((i + 1) / T, s) / cosine_alpha_bar(i / T, s), max_beta)
             for i in range(T)]
    return np.array(betas, dtype=np.float64)


def linear_betas(T: int) -> np.ndarray:
    """Linear schedule, float64 [T], from 1e-4 * 1000/T to 0.02 * 1000/T (I-DDPM / DDPM)."""
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)


def make_betas(schedule: str, T: int) -> np.ndarray:
    """Named beta schedule, float64 [T]; `schedule` is one of SCHEDULES."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {SCHEDULES}")
    return cosine_betas(T) if schedule == "cosine" else linear_betas(T)


def respaced_timesteps(T: int, K: int) -> np.ndarray:
    """The K kept timesteps (sorted int64 [K]) of a T-step chain, as I-DDPM's
    `space_timesteps(T, [K])`: stride (T-1)/(K-1) accumulated in floats, Python `round`."""
    if K < 1 or K > T:
        raise ValueError(f"cannot keep {K} of {T} timesteps (need 1 <= K <= T)")
    stride = 1.0 if K == 1 else (T - 1) / (K - 1)
    steps, cur = [], 0.0
    for _ in range(K):
        steps.append(round(cur))
        cur += stride
    return np.array(sorted(set(steps)), dtype=np.int64)


def respaced_betas(alphas_cumprod: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Betas (float64 [K]) of the chain that keeps steps `keep` of a chain with cumulative
    products `alphas_cumprod` [T]: beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}], abar before = 1."""
    kept = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(keep)]
    prev = np.append(1.0, kept[:-1])
    return 1.0 - kept / prev


# --- The Diffusion pytree

class StaticArray:
    """An immutable numpy array usable as a static pytree field (hash/eq by content)."""

    def __init__(self, value):
        self.value = np.array(value)  # read-only numpy array
        self.value.setflags(write=False)
        self._key = (self.value.dtype.str, self.value.shape, self.value.tobytes())

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticArray) and self._key == other._key

    def __repr__(self) -> str:
        return f"StaticArray(shape={self.value.shape}, dtype={self.value.dtype})"


def _schedule_constants(betas: np.ndarray) -> dict:
    """All I-DDPM GaussianDiffusion constants (float64 [T] each) from float64 betas [T]."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    if len(betas) > 1:
        post_var_clipped = np.append(post_var[1], post_var[1:])
        fixed_large = np.append(post_var[1], betas[1:])
    else:  # a one-step chain has no post_var[1]; use beta_0 (never used as noise: t == 0)
        post_var_clipped = fixed_large = betas
    return dict(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=np.append(abar[1:], 0.0),
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(post_var_clipped),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        fixed_large_variance=fixed_large,
        fixed_large_log_variance=np.log(fixed_large),
    )


@flax.struct.dataclass
class Diffusion:
    """Schedule constants of a (possibly respaced) diffusion chain; all arrays float32 [T].

    Build with `Diffusion.create` / `make_diffusion`.  `fixed_large_*` is I-DDPM's FIXED_LARGE
    variance append(posterior_variance[1], betas[1:]).  `model_timesteps[t]` is what the
    network is fed at chain index t (see module docstring).
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixed_large_variance: jax.Array
    fixed_large_log_variance: jax.Array
    model_timesteps: jax.Array
    num_timesteps: int = flax.struct.field(pytree_node=False)
    original_num_timesteps: int = flax.struct.field(pytree_node=False)
    rescale_timesteps: bool = flax.struct.field(pytree_node=False)
    betas64: StaticArray = flax.struct.field(pytree_node=False)  # float64 [T]
    timestep_map: StaticArray = flax.struct.field(pytree_node=False)  # int64 [T]

    @classmethod
    def create(cls, betas, timestep_map=None, original_num_timesteps: Optional[int] = None,
               rescale_timesteps: bool = False) -> "Diffusion":
        """From betas (float64-able [T]); timestep_map [T] gives the original timestep of each
        kept step (default arange(T)), original_num_timesteps defaults to T."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must lie in (0, 1]")
        T = len(betas)
        tmap = np.arange(T) if timestep_map is None else np.asarray(timestep_map, np.int64)
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {tmap.shape}")
        orig_T = T if original_num_timesteps is None else int(original_num_timesteps)
        model_t = tmap.astype(np.float64)
        if rescale_timesteps:
            model_t = model_t * (1000.0 / orig_T)
        consts = {k: jnp.asarray(v.astype(np.float32))
                  for k, v in _schedule_constants(betas).items()}
        return cls(**consts, model_timesteps=jnp.asarray(model_t.astype(np.float32)),
                   num_timesteps=T, original_num_timesteps=orig_T,
                   rescale_timesteps=bool(rescale_timesteps), betas64=StaticArray(betas),
                   timestep_map=StaticArray(tmap.astype(np.int64)))

    def alphas_cumprod64(self) -> np.ndarray:
        """Exact float64 cumulative products [T] of this chain (numpy, static)."""
        return np.cumprod(1.0 - self.betas64.value)

    def respace(self, K: int) -> "Diffusion":
        """Keep K evenly spaced steps of this chain (I-DDPM SpacedDiffusion); the new
        timestep_map composes with this one, so model timesteps stay in the original chain."""
        keep = respaced_timesteps(self.num_timesteps, K)
        betas = respaced_betas(self.alphas_cumprod64(), keep)
        return Diffusion.create(betas, timestep_map=self.timestep_map.value[keep],
                                original_num_timesteps=self.original_num_timesteps,
                                rescale_timesteps=self.rescale_timesteps)


def make_diffusion(schedule: str, T: int, rescale_timesteps: bool = False) -> Diffusion:
    """A T-step diffusion with a named schedule ('cosine' or 'linear')."""
    return Diffusion.create(make_betas(schedule, T), rescale_timesteps=rescale_timesteps)


# --- Forward process and posterior

def extract(arr: jax.Array, t: jax.Array, x_shape: Sequence[int]) -> jax.Array:
    """arr[t] for t [B], reshaped to [B, 1, ..., 1] (len(x_shape) axes) for broadcasting."""
    out = jnp.asarray(arr)[t]
    return out.reshape(out.shape[:1] + (1,) * (len(x_shape) - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_mean_variance(diff: Diffusion, x0: jax.Array, t: jax.Array):
    """q(x_t | x0): (mean [B,...], variance [B,1..], log_variance [B,1..])."""
    mean = extract(diff.sqrt_alphas_cumprod, t, x0.shape) * x0
    var = extract(1.0 - diff.alphas_cumprod, t, x0.shape)
    log_var = extract(diff.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, var, log_var


def q_sample(diff: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, [B, H, W, C]."""
    return (extract(diff.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(diff.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior_mean_variance(diff: Diffusion, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """q(x_{t-1} | x_t, x0): (mean [B,...], variance [B,1..], log_variance_clipped [B,1..])."""
    mean = (extract(diff.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(diff.posterior_mean_coef2, t, x_t.shape) * x_t)
    var = extract(diff.posterior_variance, t, x_t.shape)
    log_var = extract(diff.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, log_var


def predict_x0_from_eps(diff: Diffusion, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (extract(diff.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(diff.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_x0(diff: Diffusion, x_t: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
    """eps = (x_t / sqrt(abar_t) - x0) / sqrt(1 / abar_t - 1)."""
    return ((extract(diff.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
            / extract(diff.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


# --- The reverse process p(x_{t-1} | x_t)

def split_model_output(model_output: jax.Array, x_t: jax.Array, variance: str):
    """(eps [B,...,C], v [B,...,C] or None) from a model output of C or 2C channels: 2C for
    "learned_range", C (or 2C, the v half ignored) for a fixed variance."""
    _check_variance(variance)
    learned = variance == "learned_range"
    C, out_c = x_t.shape[-1], model_output.shape[-1]
    allowed = (2 * C,) if learned else (C, 2 * C)
    if out_c not in allowed:
        raise ValueError(f"model output has {out_c} channels; expected one of {allowed} "
                         f"(variance={variance!r})")
    return model_output[..., :C], (model_output[..., C:] if learned else None)


def fixed_variance(diff: Diffusion, t: jax.Array, x_shape: Sequence[int], variance: str):
    """(variance, log_variance), each broadcast to x_shape [B, ...], of a fixed variance:
    "fixed_small" beta~_t (log clipped: log beta~_1 at t = 0, where beta~_0 = 0) or
    "fixed_large" append(beta~_1, beta_{1:})."""
    if variance == "fixed_small":
        var, log_var = diff.posterior_variance, diff.posterior_log_variance_clipped
    elif variance == "fixed_large":
        var, log_var = diff.fixed_large_variance, diff.fixed_large_log_variance
    else:
        raise ValueError(f"{variance!r} is not a fixed variance; use 'fixed_small' or "
                         "'fixed_large'")
    return (jnp.broadcast_to(extract(var, t, x_shape), x_shape),
            jnp.broadcast_to(extract(log_var, t, x_shape), x_shape))


def p_mean_variance(diff: Diffusion, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    variance: str, clip_denoised: bool) -> dict:
    """p(x_{t-1} | x_t) from a model output (I-DDPM, eps prediction).

    Returns dict(mean, variance, log_variance, pred_x0, eps), each [B, H, W, C].  variance
    "learned_range": log var = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2;
    "fixed_small" / "fixed_large": `fixed_variance`.  pred_x0 is clipped to [-1, 1] only
    when clip_denoised.
    """
    eps, v = split_model_output(model_output, x_t, variance)
    if variance == "learned_range":
        min_log = extract(diff.posterior_log_variance_clipped, t, x_t.shape)
        max_log = extract(diff.log_betas, t, x_t.shape)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        var = jnp.exp(log_var)
    else:
        var, log_var = fixed_variance(diff, t, x_t.shape, variance)
    pred_x0 = predict_x0_from_eps(diff, x_t, t, eps)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(diff, pred_x0, x_t, t)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0, eps=eps)


# --- Likelihood terms

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Fast approximation of the standard normal CDF (tanh form, as I-DDPM)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability (nats, elementwise) of 8-bit data x in [-1, 1] (bins of width 2/255)
    under N(means, exp(log_scales)^2); the edge bins extend to -inf / +inf (x < -0.999 or
    x > 0.999), probabilities clamped at 1e-12 before the log."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _vb_terms(diff, model_output, x0, x_t, t, variance, clip_denoised):
    """(bits/dim [B], p_mean_variance dict) of one VLB term; see vb_terms_bpd."""
    true_mean, _, true_log_var = q_posterior_mean_variance(diff, x0, x_t, t)
    out = p_mean_variance(diff, model_output, x_t, t, variance=variance,
                          clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"]))
    return jnp.where(t == 0, nll, kl) / math.log(2.0), out


def vb_terms_bpd(diff: Diffusion, model_output: jax.Array, x0: jax.Array, x_t: jax.Array,
                 t: jax.Array, *, variance: str = "learned_range",
                 clip_denoised: bool = False) -> jax.Array:
    """One VLB term in bits/dim, [B]: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) averaged over
    dimensions, or the discretised decoder NLL -log p(x0|x1) where t == 0; p's variance is
    `variance`'s (a fixed one for "fixed_small" / "fixed_large", as I-DDPM)."""
    return _vb_terms(diff, model_output, x0, x_t, t, variance, clip_denoised)[0]


def prior_bpd(diff: Diffusion, x0: jax.Array) -> jax.Array:
    """KL(q(x_{T-1} | x0) || N(0, I)) in bits/dim, [B] (not trainable)."""
    t = jnp.full((x0.shape[0],), diff.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = q_mean_variance(diff, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


# --- Training loss and full NLL

def perturbed_x_t(diff: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array,
                  xi: Optional[jax.Array], gamma: float) -> jax.Array:
    """The training input x_t [B,H,W,C]: q_sample with noise + gamma * xi (DDPM-IP's input
    perturbation, xi ~ N(0, I) independent of noise); gamma == 0 is plain q_sample, xi unused
    (may be None)."""
    if not gamma:
        return q_sample(diff, x0, t, noise)
    if xi is None:
        raise ValueError(f"input perturbation gamma={gamma} needs the xi draw")
    return q_sample(diff, x0, t, noise + gamma * xi)


def training_losses(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, t: jax.Array,
                    noise: jax.Array, *, variance: str, vlb_weight: float = 0.001,
                    input_perturbation: float = 0.0, xi: Optional[jax.Array] = None) -> dict:
    """I-DDPM hybrid (variance "learned_range") or MSE (a fixed variance) loss for x0
    [B,H,W,C], t int [B], noise [B,H,W,C].

    The network sees x_t = `perturbed_x_t` (plain q_sample unless input_perturbation, DDPM-IP's
    gamma, is > 0; then xi [B,H,W,C] ~ N(0, I) is needed); the target stays `noise`.
    `model_fn(x_t, model_t)` is called once with model_t = diff.model_timesteps[t] (float32
    [B], the original-chain timestep), and must return [B,H,W,2C] for "learned_range", else
    [B,H,W,C].  Returns dict of [B] arrays:
      mse  = mean over dims of (noise - eps_hat)^2;
      vb   = vb_terms_bpd in bits/dim (true posterior q(x_{t-1} | x_t, x0) at this x_t) with
             the eps part stop-gradiented (so it trains only the variance); zeros for a fixed
             variance;
      loss = mse + vlb_weight * num_timesteps * vb  (I-DDPM RESCALED_MSE: vb * T / 1000).
    """
    _check_variance(variance)
    x_t = perturbed_x_t(diff, x0, t, noise, xi, input_perturbation)
    output = model_fn(x_t, diff.model_timesteps[t])
    eps, v = split_model_output(output, x_t, variance)
    mse = mean_flat((noise - eps) ** 2)
    if variance != "learned_range":
        return dict(loss=mse, mse=mse, vb=jnp.zeros_like(mse))
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(diff, frozen, x0, x_t, t, variance=variance, clip_denoised=False)
    return dict(loss=mse + vlb_weight * diff.num_timesteps * vb, mse=mse, vb=vb)


def nll_bpd(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, rng: jax.Array, *,
            variance: str, clip_denoised: bool = True) -> dict:
    """Full variational bound in bits/dim (I-DDPM calc_bpd_loop), one lax.scan over all t.

    Returns dict: total_bpd [B] = sum_t vb + prior_bpd; prior_bpd [B]; vb [B, T];
    xstart_mse [B, T]; mse [B, T] (eps error).  Column t of the [B, T] arrays is chain step t
    (ascending; I-DDPM stacks them in descending t).  One fresh noise draw per t.  With a
    fixed `variance` the terms use it (I-DDPM).
    """
    _check_variance(variance)
    B = x0.shape[0]

    def step(_, xs):
        t_scalar, key = xs
        t = jnp.full((B,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = q_sample(diff, x0, t, noise)
        output = model_fn(x_t, diff.model_timesteps[t])
        vb, out = _vb_terms(diff, output, x0, x_t, t, variance, clip_denoised)
        eps = predict_eps_from_x0(diff, x_t, t, out["pred_x0"])
        return None, (vb, mean_flat((out["pred_x0"] - x0) ** 2), mean_flat((eps - noise) ** 2))

    ts = jnp.arange(diff.num_timesteps, dtype=jnp.int32)
    keys = jax.random.split(rng, diff.num_timesteps)
    _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, (ts, keys))
    prior = prior_bpd(diff, x0)
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T
    return dict(total_bpd=vb.sum(axis=1) + prior, prior_bpd=prior, vb=vb,
                xstart_mse=xstart_mse, mse=mse)
