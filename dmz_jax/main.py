"""Command line: python -m dmz_jax.main --config=configs/X.py --workdir=DIR [--mode=...].

Modes: train (default) trains, resuming from WORKDIR, then samples and probes;
describe prints the parameter tables without touching data.
Overrides: --config.training.num_steps=100 and so on (ml_collections).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and summary.json go.")
flags.DEFINE_enum("mode", "train", ["train", "describe"], "What to do.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host: "
                  "TPU pods, SLURM; it finds the coordinator from the environment).")
flags.DEFINE_bool("fresh", False, "Move the workdir's checkpoints to checkpoints.old-<time> "
                  "and start over (needed when the config changed the model).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    config = FLAGS.config
    from dmz_jax import config_validation
    try:
        config_validation.validate_config(config)
    except config_validation.ConfigError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if FLAGS.mode == "describe":
        from dmz_jax import describe
        print(describe.describe(config))
        return 0
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required for --mode=train.")
    from dmz_jax import train  # imports jax and tensorflow: keep describe fast
    from dmz_jax import checkpointing, input_pipeline
    try:
        train.train_and_evaluate(config, FLAGS.workdir, fresh=FLAGS.fresh)
    except (input_pipeline.DatasetNotFoundError, checkpointing.ConfigMismatchError,
            train.NonFiniteError) as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
