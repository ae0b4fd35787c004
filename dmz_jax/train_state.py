"""The train state, its creation, the optimizer, EMA and the jitted train step.

The state is one pytree of arrays (params, EMA params, optimizer state, step, rng, the
non-finite counters, the timestep sampler's state), so checkpoints, shardings and donation
treat it as a whole.
"""


import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from dmz_jax import diffusion, sharding, timestep_sampler
from dmz_jax.model import DMZ, image_shape, init_variables, variables
from dmz_jax.networks.latent import Encoding


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a run depends on.

    step: int32 scalar, optimizer steps taken.  rng: uint32 [2], the run's base key; the key
    of step s is fold_in(rng, s), so a resumed run draws the same randomness.
    nonfinite_streak: int32, consecutive steps whose loss or gradient was not finite (their
    updates were skipped); skipped_steps: int32, all such steps so far.
    t_sampler: the timestep sampler's state (`dmz_jax.timestep_sampler`): None for
    "uniform", else its loss history.
    batch_stats: the running statistics of the encoder's BatchNorm (model.encoder.type
    conv_bn), None without BatchNorm. They are updated by every training step (momentum
    0.1, over the global batch) and used, as they are, with the raw and the EMA parameters
    alike (there is no EMA of them: the authors' EMA checkpoints carry the live model's BN
    buffers too).

    A pytree whose OPTIONAL_FIELDS are left out while they are None (not even an empty
    node), so a state without them has the tree, and restores the checkpoints, of the code
    before they existed (orbax refuses a target with a node its checkpoint lacks).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    skipped_steps: jax.Array
    t_sampler: Optional[Any] = None
    batch_stats: Optional[Any] = None

    OPTIONAL_FIELDS = ("t_sampler", "batch_stats")  # a class attribute, not a field (no annotation)

    def replace(self, **updates) -> "TrainState":
        return dataclasses.replace(self, **updates)


def _flatten_state(state: TrainState):
    names = tuple(f.name for f in dataclasses.fields(state)
                  if not (f.name in TrainState.OPTIONAL_FIELDS and getattr(state, f.name) is None))
    return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], names


jax.tree_util.register_pytree_with_keys(
    TrainState, _flatten_state, lambda names, children: TrainState(**dict(zip(names, children))))


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


def copy_tree(tree):
    """A copy of `tree` with buffers of its own (the EMA parameters start as one). Jit it
    when copying a whole tree outside jit: leaf by leaf, every shape compiles its own copy."""
    return jax.tree.map(jnp.copy, tree)


def create_train_state(config, model: DMZ, tx: optax.GradientTransformation) -> TrainState:
    """Initialises parameters, EMA (a copy) and optimizer state from config.seed."""
    init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    initial = init_variables(model, init_rng, image_shape(config))
    params = initial["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema_params=copy_tree(params),
                      opt_state=tx.init(params), rng=run_rng, nonfinite_streak=zero,
                      skipped_steps=zero,
                      t_sampler=timestep_sampler.init(config.training.timestep_sampler,
                                                      config.diffusion.num_timesteps),
                      batch_stats=initial.get("batch_stats"))


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


def draw_inputs(rngs: dict, x0: jax.Array, num_timesteps: int, config,
                sampler_state=None) -> dict:
    """The per-example draws of a global batch x0 [B, H, W, C], once per batch (so they do not
    depend on grad_accum_steps): {"t": int32 [B], "noise": [B, H, W, C]}, plus "weights"
    (float32 [B], 1 / (T p_t)) with a loss-aware timestep sampler and "xi" ([B, H, W, C],
    DDPM-IP's perturbation, from rngs["xi"]) when diffusion.input_perturbation > 0.
    The uniform sampler without perturbation draws exactly what `_draw_t_noise` does.
    """
    if config.training.timestep_sampler == "uniform":
        t, noise = _draw_t_noise(rngs, x0, num_timesteps)
        draws = {"t": t, "noise": noise}
    else:
        t, weights = timestep_sampler.sample(sampler_state, rngs["t"], x0.shape[0],
                                             num_timesteps)
        draws = {"t": t, "noise": jax.random.normal(rngs["noise"], x0.shape, x0.dtype),
                 "weights": weights}
    if config.diffusion.input_perturbation:
        draws["xi"] = jax.random.normal(rngs["xi"], x0.shape, x0.dtype)
    return draws


def _loss_fn(params, x0, t, noise, rngs: dict, weights: Optional[jax.Array] = None,
             xi: Optional[jax.Array] = None, batch_stats: Optional[Any] = None, *, model: DMZ,
             diff, config):
    """Training loss of images x0 [B, H, W, C] at timesteps t [B] with noise [B, H, W, C]
    (hybrid or MSE, diffusion.variance; DDPM-IP's perturbation xi [B, H, W, C] when
    diffusion.input_perturbation > 0) -> (loss, {loss, mse, vb, z_mean}: float32 means over
    the batch).

    weights [B] (a loss-aware timestep sampler's 1 / (T p_t)): the loss differentiated and
    the loss, mse and vb returned are the means of the weighted per-example terms (the
    importance-sampled estimate of the uniform-t objective), and aux also holds
    "example_loss" [B], the unweighted per-example loss (the sampler's history records it).
    batch_stats (the encoder's BatchNorm statistics, or None): the encoder normalises with
    this batch's statistics and aux["batch_stats"] holds the updated running statistics.
    """
    z, new_batch_stats = None, None
    if model.uses_latent:
        z = model.apply(variables(params, batch_stats), x0, encoding=Encoding.TRAIN, train=True,
                        method=DMZ.encode, mutable=["batch_stats"] if batch_stats else False,
                        rngs={"latent": rngs["latent"], "dropout": rngs["dropout"]})
        if batch_stats:
            z, new_batch_stats = z[0], z[1]["batch_stats"]

    def model_fn(x_t, model_t):
        return model.apply({"params": params}, x_t, model_t, z, train=True, method=DMZ.denoise,
                           rngs={"dropout": rngs["dropout"]})

    terms = diffusion.training_losses(diff, model_fn, x0, t, noise,
                                      variance=config.diffusion.variance,
                                      vlb_weight=config.diffusion.vlb_weight,
                                      input_perturbation=config.diffusion.input_perturbation,
                                      xi=xi)
    if weights is None:
        aux = {k: jnp.mean(v) for k, v in terms.items()}
    else:
        aux = {k: jnp.mean(v * weights) for k, v in terms.items()}
        aux["example_loss"] = jax.lax.stop_gradient(terms["loss"])
    aux["z_mean"] = jnp.mean(z) if z is not None else jnp.zeros(())
    if new_batch_stats is not None:
        aux["batch_stats"] = new_batch_stats
    return aux["loss"], aux


def _microbatches(x: jax.Array, steps: int) -> jax.Array:
    """[B, ...] -> [steps, B / steps, ...]; microbatch j holds examples j, j + steps, ...

    A strided split: each device's contiguous block of the batch gives every microbatch
    the same number of its own examples, so no example moves between devices.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)


def _unmicrobatch(x: jax.Array) -> jax.Array:
    """The inverse of `_microbatches`: [steps, B / steps, ...] -> [B, ...] in batch order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def mean_grads(loss_fn: Callable, params, x0: jax.Array, rngs: dict, draws: dict,
               steps: int = 1, batch_stats: Optional[Any] = None):
    """(gradient, aux) of the batch-mean loss, over `steps` microbatches of B / steps images.

    loss_fn(params, x0, t, noise, rngs, weights, xi, batch_stats) -> (loss, aux): aux of
    scalar means, optionally "example_loss" [b] and "batch_stats" (the encoder's updated
    BatchNorm statistics). draws: the batch's per-example inputs from `draw_inputs` ({t,
    noise} and maybe {weights, xi}, [B, ...] each), drawn once for the whole batch, so they
    do not depend on `steps`; with steps > 1 the dropout and latent keys are folded with the
    microbatch index. Gradients and scalar aux are summed in float32 over a lax.scan and
    divided by `steps`: the same mean as steps = 1 (equal microbatches), with the activations
    of one microbatch alive at a time; "example_loss" comes back [B] in batch order; the
    BatchNorm statistics are updated microbatch after microbatch (as the authors' trainer).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def call(x, d, keys, stats):
        return grad_fn(params, x, d["t"], d["noise"], keys, d.get("weights"), d.get("xi"),
                       stats)

    if steps == 1:
        return call(x0, draws, rngs, batch_stats)
    xs = (jnp.arange(steps), _microbatches(x0, steps),
          {k: _microbatches(v, steps) for k, v in draws.items()})

    def split(out):  # (summed part, per-example part, BatchNorm statistics)
        grads, aux = out
        stats = aux.pop("batch_stats", None)
        per_example = {k: aux.pop(k) for k in [k for k, v in aux.items() if v.ndim]}
        return (grads, aux), per_example, stats

    def body(carry, inputs):
        total, stats = carry
        j, x, d = inputs
        keys = {k: jax.random.fold_in(key, j) for k, key in rngs.items()}
        summed, per_example, stats = split(call(x, d, keys, stats))
        return (jax.tree.map(jnp.add, total, summed), stats), per_example

    first = jax.tree.map(lambda a: a[0], xs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         split(jax.eval_shape(call, first[1], first[2], rngs, batch_stats))[0])
    ((grads, aux), stats), per_example = jax.lax.scan(body, (zeros, batch_stats), xs)
    grads, aux = jax.tree.map(lambda v: v / steps, (grads, aux))
    aux = {**aux, **{k: _unmicrobatch(v) for k, v in per_example.items()}}
    if stats is not None:
        aux["batch_stats"] = stats
    return grads, aux


def train_step(state: TrainState, batch: dict, *, model: DMZ, diff: diffusion.Diffusion,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch {"image": [B, H, W, C]}, its gradient averaged
    over training.grad_accum_steps microbatches (`mean_grads`). An optional batch["stop"]
    (int32 [number of devices], each process's stop flag) comes back reduced as "stop".

    Returns (state, {"metrics": TrainMetrics of this step, "nonfinite_streak",
    "skipped_steps"}). A step whose loss or gradient norm is not finite changes nothing but
    the step counter and the non-finite counters (the timestep sampler's history included).
    With training.timestep_sampler="loss_second_moment" the metrics' loss, mse and vb are
    the importance-weighted batch means (what is differentiated), and the history records
    the unweighted per-example losses.
    """
    step_key = jax.random.fold_in(state.rng, state.step)
    rngs = dict(zip(("t", "noise", "dropout", "latent"), jax.random.split(step_key, 4)))
    if config.diffusion.input_perturbation:  # only then: the other keys stay as they were
        rngs["xi"] = jax.random.fold_in(step_key, 4)  # the step's fifth key
    draws = draw_inputs(rngs, batch["image"], diff.num_timesteps, config, state.t_sampler)
    loss_fn = functools.partial(_loss_fn, model=model, diff=diff, config=config)
    grads, out = mean_grads(loss_fn, state.params, batch["image"], rngs, draws,
                            config.training.grad_accum_steps, state.batch_stats)
    example_loss = out.pop("example_loss", None)
    batch_stats = out.pop("batch_stats", None)
    out["grad_norm"] = optax.tree.norm(grads)
    out["encoder_grad_norm"] = optax.tree.norm(grads.get("encoder", {}))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.training.ema_decay, config.training.ema_warmup)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params)
    finite = jnp.isfinite(out["loss"]) & jnp.isfinite(out["grad_norm"])
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    t_sampler = state.t_sampler
    if example_loss is not None:
        t_sampler = keep_if_finite(
            timestep_sampler.update(state.t_sampler, draws["t"], example_loss), t_sampler)
    new_state = state.replace(
        step=state.step + 1, params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32), t_sampler=t_sampler,
        batch_stats=(state.batch_stats if batch_stats is None
                     else keep_if_finite(batch_stats, state.batch_stats)))
    step_metrics = TrainMetrics.single_from_model_output(  # [1]: the mask's shape
        **{k: v[None] for k, v in out.items()}, mask=finite[None])
    outputs = {"metrics": step_metrics, "nonfinite_streak": new_state.nonfinite_streak,
               "skipped_steps": new_state.skipped_steps}
    if "stop" in batch:  # every process's stop flag, reduced: the same answer everywhere
        outputs["stop"] = jnp.max(batch["stop"])
    return new_state, outputs


def compile_train_step(config, model, diff, tx, mesh, state_sharding) -> Callable:
    """The jitted train step: state donated, batch split on the data axes."""
    step = functools.partial(train_step, model=model, diff=diff, tx=tx, config=config)
    return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)
