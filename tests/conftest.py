"""Test session setup: 8 fake CPU devices, a persistent compile cache, tiny configs."""

import os

# 8 fake CPU devices for the meshes, and XLA:CPU flags that compile faster: the tests' tiny
# networks spend far more time compiling than running. Backend optimisation level 0 (LLVM's
# -O0) cut the in-process tests' CPU time by a third (test_train, test_design_options,
# test_convert_workdir, test_sharding: 795 s -> 523 s user, 2026-12-07); the fusion emitters
# off (XLA:CPU's older elemental emitters for fusions) compiled the tiny train step in 11.7
# instead of 15.5 CPU-s (3 runs each). The computation is the same, only its machine code
# differs. Subprocesses (subprocess_env) keep these flags but not the 8 devices; the
# learning run asks for XLA's defaults, at which it runs faster (8.0 vs 5.0 steps/s on the
# tiny config). Timing lives in benchmarks/, never in tests.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
COMPILE_CACHE = os.path.join(ROOT, ".jax_cache")  # shared by the tests and their subprocesses
TINY = os.path.join(ROOT, "configs", "fashion_mnist.py") + ":tiny"  # --config= of subprocesses

jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# The longest files first: with a file per worker (--dist loadfile) they would otherwise start
# last and leave the other worker idle at the end of the run.
LONG_FILES_FIRST = ("test_learning.py", "test_preemption.py", "test_multiprocess.py",
                    "test_train.py", "test_modes.py", "test_authors_train.py",
                    "test_convert_workdir.py", "test_ablations.py", "test_device_grid.py",
                    "test_sharding.py", "test_inference.py", "test_bridge.py", "test_design_options.py",
                    "test_mutual_information.py", "test_memory_knobs.py", "test_notebook.py",
                    "test_reliability.py", "test_multihost_restore.py")


def pytest_configure(config):
    """Byte-compiles the repository's sources once, before the workers start: where
    PYTHONDONTWRITEBYTECODE is set (this machine) no process caches them, and each of the
    suite's ~60 Python processes (workers, training subprocesses) would compile them again
    (~0.7 s each; pip compiles the installed packages, not an editable checkout)."""
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        import compileall
        for folder in ("dmz_jax", "experiments", "configs", "tests"):
            compileall.compile_dir(os.path.join(ROOT, folder), quiet=2)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES_FIRST.index(name) if name in LONG_FILES_FIRST else len(LONG_FILES_FIRST)
    items.sort(key=rank)  # stable: the order inside a file is kept


def subprocess_env(cache_dir, optimized=False):
    """The environment of a `python -m dmz_jax.main` subprocess: one CPU device (a user's
    run, not the 8 fake ones), TensorFlow quiet, every compile in the shared cache_dir, and
    XLA's fast-compile flags as here (optimized=True: XLA's defaults, for runs of many
    steps)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    if not optimized:
        env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    return env


def tiny_config():
    """The offline default shrunk to a U-Net that compiles in seconds."""
    from configs import fashion_mnist
    return fashion_mnist.get_config("tiny")


@pytest.fixture
def tiny():
    return tiny_config()


def mode_config():
    """The tiny config with mode options small enough for CPU tests."""
    config = tiny_config()
    config.sampling.batch_size = 8
    config.modes.update(num_images=4, steps=5, frames=3, prior_steps=30)
    config.eval.update(fd_num_samples=32, fd_steps=(2,), classifier_steps=30, nll_examples=8,
                       recon_examples=8)
    return config


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir trained 4 steps with mode_config() (no end-of-training evaluation), shared
    by the files that use a trained model (once per pytest worker). The modes write their
    folders into it (MODE, MODE.1, ...): a test that counts them must use its own mode."""
    from dmz_jax import train
    path = str(tmp_path_factory.mktemp("trained"))
    config = mode_config()
    config.eval.at_end = False
    train.train_and_evaluate(config, path)
    return path


def trained_steps(workdir):
    """The steps of WORKDIR/checkpoints (unordered; [] when there is no such folder)."""
    folder = os.path.join(workdir, "checkpoints")
    return [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []


def saved_state(workdir, step):
    """The state saved at `step` in WORKDIR, as a dict of numpy arrays (no target needed:
    single-process checkpoints only)."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "config")) as manager:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state
