"""The train state, its creation, the optimizer, EMA and the jitted train step.

The state is one pytree of arrays (params, EMA params, optimizer state, step, rng, the
non-finite counters), so checkpoints, shardings and donation treat it as a whole.
"""


import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from dmz_jax import diffusion, sharding
from dmz_jax.model import DMZ, image_shape, init_params
from dmz_jax.networks.latent import Encoding


@flax.struct.dataclass
class TrainState:
    """Everything a run depends on.

    step: int32 scalar, optimizer steps taken.  rng: uint32 [2], the run's base key; the key
    of step s is fold_in(rng, s), so a resumed run draws the same randomness.
    nonfinite_streak: int32, consecutive steps whose loss or gradient was not finite (their
    updates were skipped); skipped_steps: int32, all such steps so far.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    skipped_steps: jax.Array


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Means over a logging window, of the finite steps only (a skipped step is masked out).

    `skipped_steps` is not a mean: it is the run's total, read from the state when logging.
    """

    loss: clu_metrics.Average.from_output("loss")
    mse: clu_metrics.Average.from_output("mse")
    vb: clu_metrics.Average.from_output("vb")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    encoder_grad_norm: clu_metrics.Average.from_output("encoder_grad_norm")
    z_mean: clu_metrics.Average.from_output("z_mean")


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with optional linear warmup, after clipping by global norm (grad_clip 0: none).

    The encoder's updates are scaled by training.encoder_lr_scale.
    """
    lr = tc.learning_rate
    if tc.warmup_steps:
        lr = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
    tx = optax.adamw(lr, weight_decay=tc.weight_decay)
    if tc.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx)
    if tc.encoder_lr_scale != 1.0:
        scale = optax.scale(tc.encoder_lr_scale)
        tx = optax.chain(tx, optax.partition(
            {"encoder": scale, "rest": optax.identity()},
            lambda params: {k: "encoder" if k == "encoder" else "rest" for k in params}))
    return tx


def make_diffusion(config: ml_collections.ConfigDict) -> diffusion.Diffusion:
    dc = config.diffusion
    return diffusion.make_diffusion(dc.schedule, dc.num_timesteps,
                                    rescale_timesteps=dc.rescale_timesteps)


def create_train_state(config, model: DMZ, tx: optax.GradientTransformation) -> TrainState:
    """Initialises parameters, EMA (a copy) and optimizer state from config.seed."""
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_params(model, init_rng, image_shape(config))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), rng=run_rng, nonfinite_streak=zero,
                      skipped_steps=zero)


def center_encoder_logits(model: DMZ, params, images: jax.Array):
    """Data-dependent init: shifts the encoder's output bias by the median logit of `images`.

    Every bit then splits the data about evenly at initialisation, so z carries information
    from the first step (without it, most bits start constant: pooled SiLU features share a
    large common component). images: [N, H, W, C] in [-1, 1].
    """
    logits = model.apply({"params": params}, images, method=DMZ.encode_logits)
    bias = params["encoder"]["to_logits"]["bias"] - jnp.median(logits, axis=0)
    encoder = {**params["encoder"], "to_logits": {**params["encoder"]["to_logits"], "bias": bias}}
    return {**params, "encoder": encoder}


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """The EMA decay of an update at `step`: min(decay, (1 + step) / (10 + step)) with warmup."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _draw_t_noise(rngs: dict, x0: jax.Array, num_timesteps: int):
    """The timesteps t (int32 [B], uniform in 0..T-1) and noise ([B, H, W, C]) of a batch."""
    t = jax.random.randint(rngs["t"], (x0.shape[0],), 0, num_timesteps)
    noise = jax.random.normal(rngs["noise"], x0.shape, x0.dtype)
    return t, noise


def _loss_fn(params, x0, t, noise, rngs: dict, *, model: DMZ, diff, config):
    """Hybrid loss of images x0 [B, H, W, C] at timesteps t [B] with noise [B, H, W, C]
    -> (loss, {loss, mse, vb, z_mean}: float32 means over the batch)."""
    variables = {"params": params}
    z = None
    if model.uses_latent:
        z = model.apply(variables, x0, encoding=Encoding.TRAIN, train=True, method=DMZ.encode,
                        rngs={"latent": rngs["latent"], "dropout": rngs["dropout"]})

    def model_fn(x_t, model_t):
        return model.apply(variables, x_t, model_t, z, train=True, method=DMZ.denoise,
                           rngs={"dropout": rngs["dropout"]})

    terms = diffusion.training_losses(diff, model_fn, x0, t, noise,
                                      learn_sigma=config.model.learn_sigma,
                                      vlb_weight=config.diffusion.vlb_weight)
    aux = {k: jnp.mean(v) for k, v in terms.items()}
    aux["z_mean"] = jnp.mean(z) if z is not None else jnp.zeros(())
    return aux["loss"], aux


def _microbatches(x: jax.Array, steps: int) -> jax.Array:
    """[B, ...] -> [steps, B / steps, ...]; microbatch j holds examples j, j + steps, ...

    A strided split: each device's contiguous block of the batch gives every microbatch
    the same number of its own examples, so no example moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)


def mean_grads(loss_fn: Callable, params, x0: jax.Array, rngs: dict, num_timesteps: int,
               steps: int = 1):
    """(gradient, aux) of the batch-mean loss, over `steps` microbatches of B / steps images.

    loss_fn(params, x0, t, noise, rngs) -> (loss, aux of scalar means). t and noise are drawn
    once for the whole batch [B, ...], so they do not depend on `steps`; with steps > 1 the
    dropout and latent keys are folded with the microbatch index. Gradients and aux are
    summed in float32 over a lax.scan and divided by `steps`: the same mean as steps = 1
    (equal microbatches), with the activations of one microbatch alive at a time.
    """
    t, noise = _draw_t_noise(rngs, x0, num_timesteps)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if steps == 1:
        return grad_fn(params, x0, t, noise, rngs)
    xs = (jnp.arange(steps), *(_microbatches(a, steps) for a in (x0, t, noise)))

    def body(total, inputs):
        j, x, tj, nj = inputs
        keys = {k: jax.random.fold_in(key, j) for k, key in rngs.items()}
        return jax.tree.map(jnp.add, total, grad_fn(params, x, tj, nj, keys)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, xs[1][0], xs[2][0], xs[3][0], rngs))
    total, _ = jax.lax.scan(body, zeros, xs)
    return jax.tree.map(lambda v: v / steps, total)


def train_step(state: TrainState, batch: dict, *, model: DMZ, diff: diffusion.Diffusion,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch {"image": [B, H, W, C]}, its gradient averaged
    over training.grad_accum_steps microbatches (`mean_grads`).

    Returns (state, {"metrics": TrainMetrics of this step, "nonfinite_streak",
    "skipped_steps"}). A step whose loss or gradient norm is not finite changes nothing but
    the step counter and the non-finite counters.
    """
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 4)
    rngs = dict(zip(("t", "noise", "dropout", "latent"), keys))
    loss_fn = functools.partial(_loss_fn, model=model, diff=diff, config=config)
    grads, out = mean_grads(loss_fn, state.params, batch["image"], rngs, diff.num_timesteps,
                            config.training.grad_accum_steps)
    out["grad_norm"] = optax.tree.norm(grads)
    out["encoder_grad_norm"] = optax.tree.norm(grads.get("encoder", {}))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.training.ema_decay, config.training.ema_warmup)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params)
    finite = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=state.step + 1, params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    step_metrics = TrainMetrics.single_from_model_output(  # [1]: the mask's shape
        **{k: v[None] for k, v in out.items()}, mask=finite[None])
    return new_state, {"metrics": step_metrics, "nonfinite_streak": new_state.nonfinite_streak,
                       "skipped_steps": new_state.skipped_steps}


def compile_train_step(config, model, diff, tx, mesh, state_sharding) -> Callable:
    """The jitted train step: state donated, batch split on the data axes."""
    step = functools.partial(train_step, model=model, diff=diff, tx=tx, config=config)
    return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)
