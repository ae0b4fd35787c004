"""The training loop: run setup, steps, logging, checkpoint cadence, signals, NaN policy.

Import from tests and notebooks:
    from dmz_jax import train
    summary = train.train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from dmz_jax import (baseline, checkpointing, config_checks, data, evaluate, preemption,
                     sharding, warm_start)
from dmz_jax.model import create_model
from dmz_jax.train_state import (TrainState, compile_train_step, create_train_state,
                                 make_diffusion, make_optimizer)


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Run:
    """What a training run sets up once: model, diffusion, optimizer, mesh, writer, manager.

    Everything that can fail on bad input (the config checks, absent data, a workdir of
    another model) fails here, before anything is compiled.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None,
                 fresh: bool = False):
        from clu import metric_writers

        self.config, self.workdir = config, workdir
        config_checks.check_config(config, num_devices=jax.device_count(),
                                   process_count=jax.process_count())
        self.info = data.dataset_info(config.data)  # fails fast when data is absent
        logging.info("Dataset: %s", self.info)
        self.mesh = mesh or sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
        self.local_batch = sharding.per_process_batch_size(config.training.batch_size)
        first = jax.process_index() * self.local_batch  # where data.train_iterator reads
        if sharding.process_rows(self.mesh, config.training.batch_size) != (
                first, first + self.local_batch):
            raise ValueError("The mesh gives this process other rows of the batch than "
                             f"rows {first}..{first + self.local_batch - 1}; build it with "
                             "sharding.create_mesh.")
        self.model = create_model(config)
        self.diff = make_diffusion(config)
        self.tx = make_optimizer(config.training)
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        checkpointing.check_shared_workdir(workdir)
        if fresh:
            checkpointing.set_aside(workdir)
        self.manager = checkpointing.create_manager(workdir, config.training.keep_checkpoints)
        init = functools.partial(create_train_state, config, self.model, self.tx)
        abstract = jax.eval_shape(init)
        self.state_sharding = sharding.state_shardings(abstract, self.mesh)  # mesh.fsdp
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        self.restored = checkpointing.restore_latest(
            self.manager, checkpointing.placed(abstract, self.state_sharding), config)
        self._init_from = None  # training.init_from: checked now, read by fresh_state
        if self.restored is None and config.training.init_from:
            self._init_from = (warm_start.check(config.training.init_from, abstract.params),
                               checkpointing.placed(abstract.params, self.state_sharding.params))
            if abstract.batch_stats is not None:
                self._init_from += (checkpointing.placed(abstract.batch_stats,
                                                         self.state_sharding.batch_stats),)
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0)

    def initial_state(self) -> TrainState:
        """The newest loadable checkpoint in the workdir, or a fresh state from config.seed."""
        return self.fresh_state() if self.restored is None else self.restored

    def fresh_state(self) -> TrainState:
        """The state a new run starts from (deterministic in config.seed and the data):
        dmz_jax.baseline.start_from, the definition that the probes' untrained baseline
        shares.

        With training.init_from, the parameters (raw and EMA) of that run's newest
        checkpoint. Else the encoder bias is centred on the first
        model.encoder.center_examples training images (fixed order), when that is > 0.
        """
        return baseline.start_from(self.config, self.model, self._init(), self._init_from,
                                   self.state_sharding.params)

    def evaluate(self, state: TrainState) -> dict:
        """Sample grids and the probe of the EMA parameters (end-of-training summary), with
        the untrained baseline (dmz_jax.baseline.untrained, training.init_from honoured)
        when eval.probe_at_init. The parameters stay as the mesh shards them."""
        return evaluate.evaluate(self.config, self.model, self.diff, state.ema_params,
                                 int(state.step), self.workdir, self.mesh, self.writer,
                                 batch_stats=state.batch_stats, init=self._init)

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.flush()


def _check_finite(outputs: dict, step: int, limit: int) -> None:
    """Raises NonFiniteError when `limit` steps in a row were not finite (outputs of `step`)."""
    streak = int(outputs["nonfinite_streak"])
    if streak >= limit:
        raise NonFiniteError(
            f"Loss or gradient not finite for {streak} steps in a row (steps "
            f"{step - streak + 1}..{step}); those updates were skipped and the last good "
            "checkpoint is kept. Rerun the same command with a lower "
            "--config.training.learning_rate (or training.grad_clip, when it is > 0): the run "
            "resumes from that checkpoint with the new value, no --fresh needed. If that does "
            "not help, check the data for NaNs.")
    if streak:
        logging.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row).",
                        step, streak)


def _write_window(run: Run, step: int, window, outputs: dict) -> Optional[float]:
    """Writes the window's means (finite steps only) and the skipped-step total."""
    scalars = {k: float(v) for k, v in window.compute().items()}
    scalars["skipped_steps"] = int(outputs["skipped_steps"])
    run.writer.write_scalars(step, scalars)
    return scalars["loss"]


def _with_stop_flag(batches, signals: preemption.StopSignals, mesh):
    """Each global batch with "stop": this process's signal flag, read as the batch is
    dispatched, one int32 per device (the train step reduces them over every process)."""
    devices, split = len(mesh.local_devices), sharding.batch_sharding(mesh)
    for batch in batches:
        flag = np.full((devices,), int(signals.requested), np.int32)
        yield {**batch, "stop": jax.make_array_from_process_local_data(split, flag)}


def train(run: Run, state: TrainState, signals: Optional[preemption.StopSignals] = None
          ) -> tuple[TrainState, Optional[float], bool]:
    """Trains from state.step to config.training.num_steps.

    Returns (state, the last window's mean loss or None, preempted). Stops early, after
    checkpointing, when a signal has set `signals.requested` on any process (preempted=True):
    the flag rides in the batch of the next step, whose output every process reads one step
    later, so all of them stop after the same step. signals: None installs a StopSignals
    for the duration of the loop.
    """
    if signals is None:
        with preemption.StopSignals() as own:
            return train(run, state, own)
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
    batches = _with_stop_flag(sharding.prefetch_to_mesh(
        data.train_iterator(config.data, batch_size=run.local_batch, seed=config.seed,
                            start_step=start_step), mesh), signals, mesh)
    report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=run.writer)
    window, last_loss, previous = None, None, None
    for step in range(start_step + 1, tc.num_steps + 1):
        state, outputs = step_fn(state, next(batches))
        stop = False
        if previous is not None:  # one step behind: reading it does not stall the device
            _check_finite(*previous, tc.max_nonfinite_steps)
            stop = bool(previous[0]["stop"])  # any process's signal, the same everywhere
        previous = (outputs, step)
        metrics = outputs["metrics"]
        window = metrics if window is None else window.merge(metrics)
        report(step)
        if step % tc.log_every == 0 or step == tc.num_steps:
            last_loss = _write_window(run, step, window, outputs)
            window = None
        if step % tc.checkpoint_every == 0 or step == tc.num_steps or stop:
            _check_finite(outputs, step, tc.max_nonfinite_steps)
            checkpointing.save(run.manager, step, state, config)
        if stop:
            logging.warning("Stopped at step %d after a signal; checkpoint written.", step)
            run.manager.wait_until_finished()
            return state, last_loss, step < tc.num_steps
        if step % tc.sample_every == 0 and step != tc.num_steps:
            evaluate.write_sample_grids(config, run.model, run.diff, state.ema_params, step,
                                        run.workdir, run.writer, mesh=run.mesh,
                                        batch_stats=state.batch_stats)
    _check_finite(*previous, tc.max_nonfinite_steps)
    run.manager.wait_until_finished()
    return state, last_loss, False


def _finished_summary(workdir: str, step: int) -> Optional[dict]:
    """summary.json of a run that already finished at `step`, or None."""
    path = epath.Path(workdir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == step else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       fresh: bool = False) -> dict:
    """Trains to config.training.num_steps (resuming from workdir), then evaluates.

    Writes WORKDIR/checkpoints, TensorBoard events, samples/*.png and summary.json; returns
    the summary dict. A finished run (summary.json at num_steps) is not redone. A preempted
    run returns {"step", "preempted": True} without evaluating. fresh=True moves existing
    checkpoints aside first.
    """
    with preemption.StopSignals() as signals:  # from the restore on: see preemption.py
        run = Run(config, workdir, fresh=fresh)
        state = run.initial_state()
        if int(state.step) >= config.training.num_steps:
            summary = _finished_summary(workdir, int(state.step))
            if summary is not None:
                logging.info("Run already finished at step %d; see %s/summary.json",
                             summary["step"], workdir)
                run.close()
                return summary
        try:
            state, last_loss, preempted = train(run, state, signals)
        except BaseException:
            run.manager.wait_until_finished()  # never leave a save half-done on the way out
            raise
    if preempted:
        run.close()
        return {"step": int(state.step), "preempted": True}
    summary = {"step": int(state.step), "train_loss": last_loss,
               "skipped_steps": int(state.skipped_steps)}
    if config.eval.at_end:
        summary.update(run.evaluate(state))
    run.close()
    if jax.process_index() == 0:
        (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("Summary: step=%d train_loss=%s probe_accuracy=%s", summary["step"],
                 summary["train_loss"], summary.get("probe_accuracy"))
    return summary
