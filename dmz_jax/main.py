"""Command line: python -m dmz_jax.main --config=configs/X.py[:variant] --workdir=DIR [--mode=...].

Modes: train (default) trains, resuming from WORKDIR, then samples and probes; describe
prints the parameter table without touching data or devices; evaluate, sample, encode,
reconstruct, interpolate, manipulate, train_prior, mutual_information, bits, train_bridge
and translate use WORKDIR's newest checkpoint (or --checkpoint) and write WORKDIR/MODE/ (see
dmz_jax/modes.py).
Overrides: --config.training.num_steps=100 and so on (ml_collections).
Several processes (training): --distributed on a TPU pod or under SLURM, or by hand
--coordinator=HOST:PORT --num_processes=N --process_id=I in each of the N processes.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file in configs/, optionally with "
                                "a variant: configs/fashion_mnist.py:tiny.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and summary.json go.")
MODES = ["train", "describe", "evaluate", "sample", "encode", "reconstruct", "interpolate",
         "manipulate", "train_prior", "mutual_information", "bits", "train_bridge", "translate"]
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("checkpoint", None, "The step to load (modes other than train); "
                     "default: the newest.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host: "
                  "TPU pods, SLURM; it finds the coordinator from the environment).")
flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for several processes "
                    "started by hand (with --num_processes and --process_id); implies "
                    "--distributed. E.g. two processes on one machine: localhost:12355.")
flags.DEFINE_integer("num_processes", None, "How many processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 "
                     "(with --coordinator).")
flags.DEFINE_float("peer_timeout", 60.0, "Several processes: seconds without a sign of life "
                   "from another process before this one exits with code 76 (see "
                   "dmz_jax/preemption.py); keep it below JAX's heartbeat timeout (100 s).")
flags.DEFINE_bool("fresh", False, "Move the workdir's checkpoints to checkpoints.old-<time> "
                  "and start over (needed when the config changed the model).")
flags.mark_flags_as_required(["config"])


def _refuse(error: Exception) -> int:
    print(f"\nERROR: {error}", file=sys.stderr)
    return 2


def describe(config) -> int:
    """Checks the config without device facts and prints the parameter table."""
    from dmz_jax import config_checks, describe as describe_lib
    try:
        config_checks.check_config(config)
    except config_checks.ConfigError as e:
        return _refuse(e)
    print(describe_lib.describe(config))
    return 0


def start_processes() -> None:
    """jax.distributed.initialize() from the flags (or the cluster's environment)."""
    explicit = {"--coordinator": FLAGS.coordinator, "--num_processes": FLAGS.num_processes,
                "--process_id": FLAGS.process_id}
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        raise app.UsageError(f"{', '.join(given)} given without "
                             f"{', '.join(sorted(set(explicit) - set(given)))}: "
                             "--coordinator, --num_processes and --process_id go together.")
    if given and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise app.UsageError(f"--process_id={FLAGS.process_id} is not in "
                             f"0..{FLAGS.num_processes - 1}.")
    if given or FLAGS.distributed:
        import jax
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)


def train(config) -> int:
    """Exit code 0 (finished), 2 (refused), 75 (preempted) or 76 (another process lost):
    see dmz_jax/preemption.py."""
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required for --mode=train.")
    start_processes()
    from dmz_jax import checkpointing, config_checks, data, preemption
    from dmz_jax import train as train_lib  # imports TensorFlow: keep describe fast
    watchdog = preemption.start_watchdog(FLAGS.peer_timeout)
    try:
        summary = train_lib.train_and_evaluate(config, FLAGS.workdir, fresh=FLAGS.fresh)
    except (config_checks.ConfigError, data.DatasetNotFoundError,
            checkpointing.ConfigMismatchError, checkpointing.CheckpointRestoreError,
            checkpointing.WorkdirNotSharedError, train_lib.NonFiniteError) as e:
        if watchdog:
            watchdog.stop()
        return _refuse(e)
    except BaseException:
        if watchdog is None:
            raise
        watchdog.exit_after_failure()  # 76 when another process was lost, else 1
    if watchdog:
        watchdog.stop()
    return preemption.EXIT_PREEMPTED if summary.get("preempted") else 0


def use(config) -> int:
    """The modes that use a trained model (dmz_jax.modes, dmz_jax.evaluate)."""
    if not FLAGS.workdir:
        raise app.UsageError(f"--workdir is required for --mode={FLAGS.mode}.")
    if FLAGS.distributed or FLAGS.coordinator:
        return _refuse(ValueError(
            f"--mode={FLAGS.mode} runs in one process (it uses every device of its host); "
            "start it on one host without --distributed or --coordinator."))
    from dmz_jax import api, checkpointing, config_checks, data, evaluate, modes
    from dmz_jax.metrics.inception import FidWeightsError
    run = evaluate.run_evaluation if FLAGS.mode == "evaluate" else modes.MODES[FLAGS.mode]
    try:
        config_checks.check_config(config)
        out = run(config, FLAGS.workdir, FLAGS.checkpoint)
    except (config_checks.ConfigError, data.DatasetNotFoundError, api.NoCheckpointError,
            checkpointing.ConfigMismatchError, modes.ModeError, FidWeightsError) as e:
        return _refuse(e)
    print(f"Wrote {out}")
    return 0


def main(argv):
    del argv
    return {"describe": describe, "train": train}.get(FLAGS.mode, use)(FLAGS.config)


if __name__ == "__main__":
    app.run(main)
