"""python -m dmz_jax.convert --config=configs/authors/celebahq256.py --weights=FILE
    --kind=unet|diffdecoder --workdir=OUT [--strict=false] [--config.x=y ...]

Writes OUT/checkpoints/0 (the converted weights; every other parameter as a new run of the
config starts) and OUT/convert_report.json; then train with
--config.training.init_from=OUT. See dmz_jax/convert/workdir.py.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config the weights are converted for "
                                "(configs/authors/celebahq256.py).", lock_config=True)
flags.DEFINE_string("weights", None, "A .safetensors or .npz state dict (PyTorch pickles: "
                    "tools/torch_to_npz.py first).")
flags.DEFINE_enum("kind", None, ["unet", "diffdecoder"], "unet: a diffusers UNet2DModel / "
                  "UNet2DConditionModel for the denoiser; diffdecoder: the authors' whole model.")
flags.DEFINE_string("workdir", None, "The new workdir (no checkpoints in it yet).")
flags.DEFINE_bool("strict", True, "false: load what fits by name and shape and keep the init "
                  "for the rest (the authors' load_state_dict(strict=False)); --kind=unet only.")
flags.mark_flags_as_required(["config", "weights", "kind", "workdir"])


def main(argv):
    del argv
    from dmz_jax.config_checks import ConfigError
    from dmz_jax.convert.workdir import REPORT, convert_to_workdir
    try:
        report = convert_to_workdir(FLAGS.config, FLAGS.weights, FLAGS.kind, FLAGS.workdir,
                                    FLAGS.strict)
    except (ValueError, FileExistsError, FileNotFoundError, ConfigError) as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {FLAGS.workdir}/checkpoints/0: {len(report['loaded'])} tensors "
          f"({report['loaded_parameters']:,} numbers) from {FLAGS.weights}, "
          f"{report['fresh_parameters']:,} numbers at init (not loaded: "
          f"{len(report['not_loaded'])}, unexpected: {len(report['unexpected'])}); "
          f"see {FLAGS.workdir}/{REPORT}. Next: --config.training.init_from={FLAGS.workdir}")
    return 0


if __name__ == "__main__":
    app.run(main)
