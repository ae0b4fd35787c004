"""Training and evaluation of DMZ: one jitted step on a device mesh, EMA, checkpoints, logs.

Import from tests and notebooks:
    from dmz_jax import train
    summary = train.train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dmz_jax import (checkpointing, config_validation, diffusion, images, input_pipeline, probe,
                     samplers, sharding)
from dmz_jax.model import DMZ, create_model, init_params


@flax.struct.dataclass
class TrainState:
    """Everything a run depends on, as one pytree of arrays.

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


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with optional linear warmup.

    The encoder's updates are scaled by training.encoder_lr_scale.
    """
    lr = tc.learning_rate
    if tc.warmup_steps:
        lr = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(lr, weight_decay=tc.weight_decay))
    if tc.encoder_lr_scale != 1.0:
        scale = optax.scale(tc.encoder_lr_scale)
        tx = optax.chain(tx, optax.partition(
            {"encoder": scale, "rest": optax.identity()},
            lambda params: {k: "encoder" if k == "encoder" else "rest" for k in params}))
    return tx


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


def make_diffusion(config: ml_collections.ConfigDict) -> diffusion.Diffusion:
    dc = config.diffusion
    return diffusion.make_diffusion(dc.schedule, dc.num_timesteps,
                                    rescale_timesteps=dc.rescale_timesteps)


def image_shape(config) -> tuple[int, int, int]:
    return (config.data.image_size, config.data.image_size, config.data.channels)


def create_train_state(config, model: DMZ, tx: optax.GradientTransformation) -> TrainState:
    """Initialises parameters, EMA (a copy) and optimizer state from config.seed."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng, run_rng = jax.random.split(rng)
    params = init_params(model, init_rng, image_shape(config))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), rng=run_rng, nonfinite_streak=zero,
                      skipped_steps=zero)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up: min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, *, model: DMZ, diff: diffusion.Diffusion,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch {"image": [B, H, W, C]} -> (state, metrics).

    A step whose loss or gradient norm is not finite changes nothing but the step counter and
    the non-finite counters: params, EMA and optimizer state stay as they were.
    """
    x0 = batch["image"]
    step_rng = jax.random.fold_in(state.rng, state.step)
    t_rng, noise_rng, dropout_rng, latent_rng = jax.random.split(step_rng, 4)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, diff.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)

    def loss_fn(params):
        variables = {"params": params}
        z = None
        if model.uses_latent:
            z = model.apply(variables, x0, "train", True, method=DMZ.encode,
                            rngs={"latent": latent_rng, "dropout": dropout_rng})

        def model_fn(x_t, model_t):
            return model.apply(variables, x_t, model_t, z, True, method=DMZ.denoise,
                               rngs={"dropout": dropout_rng})

        terms = diffusion.training_losses(diff, model_fn, x0, t, noise,
                                          learn_sigma=config.model.learn_sigma,
                                          vlb_weight=config.diffusion.vlb_weight)
        aux = {k: jnp.mean(v) for k, v in terms.items()}
        if z is not None:
            aux["z_mean"] = jnp.mean(z)
        return aux["loss"], aux

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if "encoder" in grads:
        metrics["encoder_grad_norm"] = optax.tree.norm(grads["encoder"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.training.ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state), nonfinite_streak=streak,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics["nonfinite_streak"] = streak
    metrics["skipped_steps"] = new_state.skipped_steps
    return new_state, metrics


def compile_train_step(config, model, diff, tx, mesh, state_sharding) -> Callable:
    """The jitted train step: state replicated (donated), batch split on the data axes."""
    step = functools.partial(train_step, model=model, diff=diff, tx=tx, config=config)
    return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_sample_fn(config, model: DMZ, diff: diffusion.Diffusion, num_steps: int) -> Callable:
    """jit(params, rng) -> [num_samples, H, W, C] images in [-1, 1], z ~ the latent prior."""
    from dmz_jax.networks import latent as latent_lib

    n = config.sampling.num_samples
    shape = (n, *image_shape(config))

    def sample(params, rng):
        z_rng, x_rng = jax.random.split(rng)
        z = None
        if model.uses_latent:
            z = latent_lib.get_latent_type(model.latent_type).prior(z_rng, n, model.latent_dim)

        def model_fn(x_t, model_t):
            return model.apply({"params": params}, x_t, model_t, z, False, method=DMZ.denoise)

        return samplers.sample(diff, model_fn, shape, x_rng, method=config.sampling.method,
                               num_steps=num_steps, learn_sigma=config.model.learn_sigma,
                               eta=config.sampling.eta,
                               clip_denoised=config.sampling.clip_denoised)

    return jax.jit(sample)


def make_encode_fn(model: DMZ, mesh) -> Callable:
    """jit(params, images [B, H, W, C]) -> deterministic codes [B, latent_dim]."""

    def encode(params, x):
        return model.apply({"params": params}, x, "encode", False, method=DMZ.encode)

    return jax.jit(encode, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def encode_dataset(encode_fn, params, x: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Encodes [N, H, W, C] in fixed-size batches (the last one padded) -> [N, latent_dim]."""
    codes = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                                 chunk.dtype)]) if len(chunk) < batch_size else chunk
        out = encode_fn(params, jax.device_put(padded, sharding.batch_sharding(mesh)))
        codes.append(np.asarray(out)[:len(chunk)])
    return np.concatenate(codes)


def evaluate_probe(config, model, params, mesh, baseline_params=None) -> dict:
    """Linear-probe accuracy of the deterministic codes of `params` (train -> test split).

    With `baseline_params` (e.g. the untrained encoder), also `probe_accuracy_at_init`,
    from the same loaded splits and the same compiled encoder.
    """
    encode_fn = make_encode_fn(model, mesh)
    batch = config.eval.encode_batch_size
    train = input_pipeline.load_split(config.data, "train", config.eval.probe_train_examples)
    test = input_pipeline.load_split(config.data, "test", config.eval.probe_test_examples)

    def codes_and_accuracy(p):
        train_codes = encode_dataset(encode_fn, p, train["image"], batch, mesh)
        test_codes = encode_dataset(encode_fn, p, test["image"], batch, mesh)
        return train_codes, probe.linear_probe_accuracy(train_codes, train["label"],
                                                        test_codes, test["label"])

    train_codes, accuracy = codes_and_accuracy(params)
    result = {"probe_accuracy": accuracy,
              "bit_means": train_codes.mean(0).round(4).tolist(),
              "distinct_codes_train": int(len(np.unique(train_codes, axis=0)))}
    if baseline_params is not None:
        result["probe_accuracy_at_init"] = codes_and_accuracy(baseline_params)[1]
    return result


def write_sample_grids(run: "Run", params, step: int) -> list[str]:
    """Samples with each of config.sampling.steps; writes PNGs and TensorBoard images."""
    config, paths = run.config, []
    os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
    for k in config.sampling.steps:
        sample_fn = make_sample_fn(config, run.model, run.diff, int(k))
        x = np.asarray(sample_fn(params, jax.random.PRNGKey(config.seed + 1)))
        grid = images.make_grid(images.to_uint8(x))
        path = os.path.join(run.workdir, "samples", f"step{step:08d}_K{int(k)}.png")
        if jax.process_index() == 0:
            images.save_png(path, grid)
        run.writer.write_images(step, {f"samples/K{int(k)}": grid[None]})
        paths.append(path)
        logging.info("Wrote %s", path)
    return paths


def _mean_metrics(history: list[dict]) -> dict:
    history = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


class Run:
    """What a training run sets up once: model, diffusion, optimizer, mesh, writer, manager.

    Everything that can fail on bad input (config validation, absent data, a workdir of
    another model) fails here, before anything is compiled.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None,
                 fresh: bool = False):
        from clu import metric_writers

        self.config, self.workdir = config, workdir
        config_validation.validate_config(config)  # every problem at once, before any compile
        self.info = input_pipeline.dataset_info(config.data)  # fails fast when data is absent
        logging.info("Dataset: %s", self.info)
        self.mesh = mesh or sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
        self.local_batch = sharding.per_process_batch_size(config.training.batch_size)
        self.model = create_model(config)
        self.diff = make_diffusion(config)
        self.tx = make_optimizer(config.training)
        os.makedirs(workdir, exist_ok=True)
        if fresh:
            checkpointing.set_aside(workdir)
        self.manager = checkpointing.create_manager(workdir, config.training.keep_checkpoints)
        self.state_sharding = sharding.replicated(self.mesh)
        self._init = jax.jit(functools.partial(create_train_state, config, self.model, self.tx),
                             out_shardings=self.state_sharding)
        self.restored = checkpointing.restore_latest(self.manager, jax.eval_shape(self._init),
                                                     config)
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0)

    def initial_state(self) -> TrainState:
        """The newest loadable checkpoint in the workdir, or a fresh state from config.seed.

        A fresh state's encoder bias is centred on the first model.encoder.center_examples
        training images (fixed order), when that is > 0.
        """
        return self.fresh_state() if self.restored is None else self.restored

    def fresh_state(self) -> TrainState:
        """The state a new run starts from (deterministic in config.seed and the data)."""
        state = self._init()
        n = self.config.model.encoder.center_examples
        if self.model.uses_latent and n:
            images = input_pipeline.load_split(self.config.data, "train", n)["image"]
            params = jax.jit(functools.partial(center_encoder_logits, self.model),
                             out_shardings=self.state_sharding)(state.params, images)
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        return state

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.flush()


class StopSignals:
    """SIGTERM/SIGINT handling for preemptible jobs.

    The first signal sets `requested`: the loop finishes its step, checkpoints and returns.
    A second signal exits at once (orbax never leaves a half-written checkpoint that looks
    complete). On several hosts, JAX's preemption sync point makes all hosts stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            logging.warning("Second signal %d: exiting now without a checkpoint.", signum)
            os._exit(128 + signum)
        self.requested = True
        logging.warning("Signal %d: finishing this step, checkpointing and exiting.", signum)

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _check_finite(metrics: dict, step: int, limit: int) -> None:
    """Raises NonFiniteError when `limit` steps in a row were not finite (metrics of `step`)."""
    streak = int(metrics["nonfinite_streak"])
    if streak >= limit:
        raise NonFiniteError(
            f"Loss or gradient not finite for {streak} steps in a row (steps "
            f"{step - streak + 1}..{step}); those updates were skipped and the last good "
            "checkpoint is kept. Lower training.learning_rate or check the data.")
    if streak:
        logging.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row).",
                        step, streak)


def train(run: Run, state: TrainState) -> tuple[TrainState, Optional[float], bool]:
    """Trains from state.step to config.training.num_steps.

    Returns (state, last mean loss or None, preempted). Stops early, after checkpointing,
    when SIGTERM/SIGINT arrives (preempted=True).
    """
    from clu import periodic_actions

    config, tc, mesh = run.config, run.config.training, run.mesh
    start_step = int(state.step)
    if start_step:
        logging.info("Resuming training at step %d of %d", start_step, tc.num_steps)
    else:
        hparams = checkpointing.flatten_dict(config.to_dict())
        run.writer.write_hparams({k: str(v) for k, v in hparams.items()})
    if start_step >= tc.num_steps:
        return state, None, False
    step_fn = compile_train_step(config, run.model, run.diff, run.tx, mesh, run.state_sharding)
    data = input_pipeline.train_iterator(config.data, batch_size=run.local_batch,
                                         seed=config.seed, start_step=start_step)
    report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=run.writer)
    history, last_loss, t_start, previous = [], None, time.time(), None
    with StopSignals() as signals:
        for step in range(start_step + 1, tc.num_steps + 1):
            state, metrics = step_fn(state, sharding.global_batch(next(data), mesh))
            if previous is not None:  # one step behind: reading it does not stall the device
                _check_finite(*previous, tc.max_nonfinite_steps)
            previous = (metrics, step)
            history.append(metrics)
            report(step)
            if step % tc.log_every == 0 or step == tc.num_steps:
                means = _mean_metrics(history)
                last_loss, history = means["loss"], []
                rate = (step - start_step) / (time.time() - t_start)
                means["eta_seconds"] = (tc.num_steps - step) / rate
                run.writer.write_scalars(step, means)
            stop = signals.should_stop(step)
            if step % tc.checkpoint_every == 0 or step == tc.num_steps or stop:
                _check_finite(metrics, step, tc.max_nonfinite_steps)
                checkpointing.save(run.manager, step, state, config)
            if stop:
                logging.warning("Stopped at step %d after a signal; checkpoint written.", step)
                run.manager.wait_until_finished()
                return state, last_loss, True
            if step % tc.sample_every == 0 and step != tc.num_steps:
                write_sample_grids(run, state.ema_params, step)
    _check_finite(*previous, tc.max_nonfinite_steps)
    run.manager.wait_until_finished()
    return state, last_loss, False


def evaluate(run: Run, state: TrainState) -> dict:
    """Sample grids and the linear probe, from the EMA parameters."""
    step = int(state.step)
    summary = {"step": step}
    summary["samples"] = write_sample_grids(run, state.ema_params, step)
    if run.model.uses_latent and run.info.num_classes > 1:
        # the baseline, the untrained encoder: how much of the probe did training add?
        baseline = run.fresh_state().params if run.config.eval.probe_at_init else None
        summary.update(evaluate_probe(run.config, run.model, state.ema_params, run.mesh,
                                      baseline_params=baseline))
    else:  # no latent, or no class labels (celeb_a: attributes, not classes)
        summary["probe_accuracy"] = None
    if summary["probe_accuracy"] is not None:
        run.writer.write_scalars(step, {"probe_accuracy": summary["probe_accuracy"]})
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       fresh: bool = False) -> dict:
    """Trains to config.training.num_steps (resuming from workdir), then evaluates.

    Writes WORKDIR/checkpoints, TensorBoard events, samples/*.png and summary.json; returns
    the summary dict. A finished run (summary.json at num_steps) is not redone. A preempted
    run returns {"step", "preempted": True} without evaluating. fresh=True moves existing
    checkpoints aside first.
    """
    summary_path = os.path.join(workdir, "summary.json")
    run = Run(config, workdir, fresh=fresh)
    state = run.initial_state()
    if int(state.step) >= config.training.num_steps and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("step") == int(state.step):
            logging.info("Run already finished at step %d; see %s", summary["step"], summary_path)
            run.close()
            return summary
    try:
        state, last_loss, preempted = train(run, state)
    except BaseException:
        run.manager.wait_until_finished()  # never leave a save half-done on the way out
        raise
    if preempted:
        run.close()
        return {"step": int(state.step), "preempted": True}
    summary = {"step": int(state.step), "train_loss": last_loss,
               "skipped_steps": int(state.skipped_steps)}
    if config.eval.at_end:
        summary.update(evaluate(run, state))
    run.close()
    if jax.process_index() == 0:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("Summary: step=%d train_loss=%s probe_accuracy=%s", summary["step"],
                 summary["train_loss"], summary.get("probe_accuracy"))
    return summary
