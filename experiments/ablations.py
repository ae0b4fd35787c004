"""Ablations: trains a named grid of DMZ variants and seeds at one budget, evaluates every run
with one protocol, and writes a report (tables, plots, a verdict per claim of the paper).

    python experiments/ablations.py --grid=experiments/grids/cpu.py \
        --root=runs/ablations_cpu --results=docs/results.md

A grid file (experiments/grids/*.py) defines `get_grid()`: the base config, the overrides
every run shares (the budget), the variants (named config overrides), the seeds and the
evaluation protocol. Each run lives in ROOT/VARIANT/seedS: a normal training workdir
(checkpoints, summary.json, samples/) plus ablation.json, its evaluation. The runner is
resume-safe: it can be stopped at any moment and rerun; a trained run (summary.json at the
budget) is not retrained, an evaluated one (ablation.json with the same protocol) is not
re-evaluated, and the report is rendered from the stored results alone, so a rerun writes
the same report. Runs go seed by seed (every variant's first seed first), so a stopped grid
already compares each variant once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import sys
import time
from typing import Optional

if __package__ in (None, ""):  # `python experiments/ablations.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from etils import epath

FLAGS = flags.FLAGS
flags.DEFINE_string("grid", None, "A grid file: experiments/grids/cpu.py, gpu.py, tiny.py.")
flags.DEFINE_string("root", None, "Where the runs go (one workdir per variant and seed).")
flags.DEFINE_string("results", "docs/results.md", "The report to write; its plots and sample "
                    "grids go to a folder beside it with the same stem.")
flags.DEFINE_bool("report_only", False, "Only render the report from what is stored.")

PROTOCOL_KEYS = ("fd_steps", "fd_num_samples", "fd_features", "classifier_steps",
                 "nll_examples", "prior_steps", "curve_steps", "ddim_variants",
                 "prior_variants", "curve_variants", "sweep_variants", "fd_repeats",
                 "infodiffusion_probe")


class GridError(ValueError):
    """A grid file names an unknown key, a bad value or an unknown variant."""


def load_grid(path: str) -> dict:
    """The dict returned by get_grid() in the grid file at `path`, with its source path."""
    if not epath.Path(path).exists():
        raise GridError(f"no grid file {path}; see experiments/grids/")
    spec = importlib.util.spec_from_file_location("ablation_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = dict(module.get_grid(), path=path)
    missing = {"name", "base", "common", "seeds", "variants", "protocol"} - set(grid)
    if missing:
        raise GridError(f"{path}: get_grid() lacks {sorted(missing)}")
    unknown = set(grid["protocol"]) - set(PROTOCOL_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown protocol keys {sorted(unknown)}; known: "
                        f"{PROTOCOL_KEYS}")
    for key in ("ddim_variants", "prior_variants", "curve_variants", "sweep_variants"):
        stray = set(grid["protocol"].get(key, ())) - set(grid["variants"])
        if stray:
            raise GridError(f"{path}: protocol.{key} names variants not in the grid: "
                            f"{sorted(stray)}")
    return grid


def _base_config(grid: dict):
    path, _, arg = grid["base"].partition(":")
    spec = importlib.util.spec_from_file_location("ablation_base_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def run_config(grid: dict, variant: str, seed: int):
    """The config of one run: base, then the shared overrides, the variant's, the seed and
    the protocol's evaluation settings (eval.* and modes.prior_steps)."""
    config = _base_config(grid)
    p = grid["protocol"]
    try:
        config.update_from_flattened_dict(dict(grid["common"]))
        config.update_from_flattened_dict(dict(grid["variants"][variant]))
    except (KeyError, TypeError, AttributeError) as e:
        raise GridError(f"{grid['path']}: variant {variant!r}: {e}") from e
    config.seed = int(seed)
    config.eval.fd_steps = tuple(p["fd_steps"])
    config.eval.fd_num_samples = int(p["fd_num_samples"])
    config.eval.fd_features = p.get("fd_features", "auto")
    config.eval.classifier_steps = int(p["classifier_steps"])
    config.eval.nll_examples = int(p["nll_examples"])
    config.modes.prior_steps = int(p["prior_steps"])
    config.sampling.method, config.sampling.eta = "ancestral", 0.0
    return config


def runs_of(grid: dict) -> list[tuple[str, int]]:
    """(variant, seed) in running order: tier by tier (grid["order"]: tuples of variants;
    default one tier of every variant), each tier seed by seed, so that a stopped grid
    already holds whole paired comparisons."""
    tiers = grid.get("order") or (tuple(grid["variants"]),)
    return [(v, int(s)) for tier in tiers for s in grid["seeds"] for v in tier]


def workdir_of(root: str, variant: str, seed: int) -> str:
    return os.path.join(root, variant, f"seed{seed}")


def check_grid(grid: dict) -> None:
    """Every run's config through config_checks, all problems at once, before any compile."""
    import jax
    from dmz_jax import config_checks
    problems = []
    for variant, seed in runs_of(grid):
        try:
            config_checks.check_config(run_config(grid, variant, seed),
                                       num_devices=jax.device_count(),
                                       process_count=jax.process_count())
        except config_checks.ConfigError as e:
            problems.append(f"{variant}/seed{seed}: {e}")
    if problems:
        raise GridError("\n".join(problems))


def _read_json(path: str) -> Optional[dict]:
    """The JSON at `path` (local or gs://), or None when there is none."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: str, values: dict) -> None:
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True))
    tmp.replace(path)  # never a half-written result


def train_run(config, workdir: str) -> dict:
    """Trains (or resumes) one run to its budget; returns summary.json. The wall time of
    every invocation that trained it adds up in timing.json."""
    from dmz_jax import train
    summary = _read_json(os.path.join(workdir, "summary.json"))
    if summary and summary.get("step") == config.training.num_steps:
        logging.info("Skip training %s: finished", workdir)
        return summary
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    timing_path = os.path.join(workdir, "timing.json")
    start = time.time()
    try:
        summary = train.train_and_evaluate(config, workdir)
    finally:
        timing = _read_json(timing_path) or {"train_seconds": 0.0}
        timing["train_seconds"] += time.time() - start
        _write_json(timing_path, timing)
    if summary.get("preempted"):
        raise KeyboardInterrupt(f"{workdir} stopped at step {summary['step']}")
    return summary


class Features:
    """The protocol's feature network and the real images' statistics, built on first use
    from the grid's base settings (seed 0), so that every run is measured alike."""

    def __init__(self, grid: dict):
        self.grid, self._built = grid, None

    def get(self):
        """(name, images -> features, real statistics (mu, sigma), notes)."""
        if self._built is None:
            from dmz_jax import data, evaluate
            from dmz_jax.metrics import frechet
            config = run_config(self.grid, next(iter(self.grid["variants"])), 0)
            n = config.eval.fd_num_samples
            train = data.load_split(config.data, "train", n)
            test = data.load_split(config.data, "test", config.eval.probe_test_examples)
            name, fn, notes = evaluate.feature_network(config, train, test)
            real = frechet.feature_statistics(fn(train["image"][:n]))
            self._built = name, fn, real, notes
        return self._built


def _fd(model, features: Features, n: int, k: int, seed: Optional[int] = None,
        **kwargs) -> float:
    """FD of n samples at K = k (z and x_T from `seed`, default sampling.seed: every variant
    of a grid draws the same noise) against the protocol's real statistics."""
    from dmz_jax import evaluate
    from dmz_jax.metrics import frechet
    _, fn, real, _ = features.get()
    seed = model.config.sampling.seed if seed is None else seed
    stats = evaluate.sample_statistics(model, fn, n, steps=k, seed=seed, **kwargs)
    return float(frechet.frechet_distance(*stats.statistics(), *real))


def infodiffusion_probe(model, config, protocol: dict) -> dict:
    """InfoDiffusion's latent-quality probe (metrics.probes.infodiffusion_probe: 5-fold
    logistic regression on standardised codes) on the deterministic codes of the split that
    protocol["infodiffusion_probe"] names, for the trained encoder and for the untrained one
    (dmz_jax.baseline.untrained: the state this run started from)."""
    from dmz_jax import baseline, data
    from dmz_jax.metrics import probes
    split = data.load_split(config.data, protocol["infodiffusion_probe"])
    untrained = model.with_params(*baseline.untrained(config, model.model, model.mesh))
    out = {"split": protocol["infodiffusion_probe"], "examples": int(len(split["label"]))}
    for suffix, m in (("", model), ("_at_init", untrained)):
        m = m.with_batch_size(config.eval.encode_batch_size)
        mean, std = probes.infodiffusion_probe(m.encode(split["image"]), split["label"],
                                               seed=0)  # their random_state, every seed
        out.update({"accuracy" + suffix: mean, "accuracy_std" + suffix: std})
    return out


def _learned_prior(model, config, workdir: str) -> Optional[dict]:
    """Trains the bit prior once (what --mode=train_prior does, on `model`, the run's loaded
    checkpoint: no second load); its bits/code on the test codes."""
    from dmz_jax import data, modes
    from dmz_jax import prior as prior_lib
    if epath.Path(model.prior_path).exists():
        return _read_json(os.path.join(workdir, "train_prior", "metrics.json"))
    test = data.load_split(config.data, "test", config.eval.probe_test_examples)
    kwargs = {"width": config.modes.prior_width}
    params, metrics = prior_lib.fit(model.training_codes(), model.encode(test["image"]),
                                    steps=config.modes.prior_steps, seed=config.seed,
                                    model_kwargs=kwargs)
    prior_lib.save_prior(model.prior_path, params, kwargs)
    metrics.update(step=model.step, prior_steps=config.modes.prior_steps,
                   saved_to=model.prior_path)
    _write_json(os.path.join(modes.output_dir(workdir, "train_prior"), "metrics.json"), metrics)
    return metrics


def _nll(model, test_images) -> dict:
    """The full VLB of the test images in bits/dim, given z = encode(x), and the bound on
    -log2 p(x) with z's own |z| bits added (Bernoulli(0.5) prior, deterministic encoder).
    In one batch when they fit (each image's noise is its own: the batch does not matter)."""
    devices = model.mesh.size
    model = model.with_batch_size(-(-len(test_images) // devices) * devices)
    given_z = float(model.nll_bpd(test_images).mean())
    bits = model.latent_dim if model.model.uses_latent else 0
    dims = test_images[0].size
    # a Gaussian z has no discrete code length: no bound
    bound = given_z + bits / dims if model.config.model.latent_type != "gaussian" else None
    return {"nll_bpd_given_z": given_z, "nll_bpd_bound": bound}


def curve(model, config, workdir: str, features: Features, n: int, k: int,
          test_images) -> list[dict]:
    """FD at K = k and the NLL at every checkpoint of the run, each checkpoint loaded once
    (`model`, the newest, is not loaded again)."""
    from dmz_jax import api
    points = []
    for step in api.checkpoint_steps(workdir):
        at_step = model if step == model.step else api.load(
            workdir, checkpoint=step, config=config, mesh=model.mesh)
        points.append({"step": step, f"fd_K{k}": _fd(at_step, features, n, k),
                       **_nll(at_step, test_images)})
    return points


def evaluate_run(grid: dict, variant: str, seed: int, config, workdir: str,
                 features: Features) -> dict:
    """The protocol on one trained run; what it measures, for the report (ablation.json)."""
    from dmz_jax import api, data
    p = grid["protocol"]
    start, n = time.time(), int(p["fd_num_samples"])
    summary = _read_json(os.path.join(workdir, "summary.json"))
    model = api.load(workdir, config=config)
    fd = {"ancestral": {str(k): _fd(model, features, n, int(k)) for k in p["fd_steps"]}}
    result = {"variant": variant, "seed": seed, "step": model.step, "fd": fd}
    if int(p.get("fd_repeats", 1)) > 1:  # the sample-to-sample spread of one trained model
        k0 = int(p["fd_steps"][0])
        fd["repeats"] = {str(k0): [fd["ancestral"][str(k0)]] + [
            _fd(model, features, n, k0, seed=model.config.sampling.seed + r)
            for r in range(1, int(p["fd_repeats"]))]}
    if p.get("infodiffusion_probe") and model.model.uses_latent:
        result["probe_infodiffusion"] = infodiffusion_probe(model, config, p)
    if variant in p.get("ddim_variants", ()):
        fd["ddim"] = {str(k): _fd(model, features, n, int(k), method="ddim")
                      for k in p["fd_steps"]}
    if variant in p.get("prior_variants", ()) and config.model.latent_type == "binary":
        result["prior"] = _learned_prior(model, config, workdir)
        fd["learned"] = {str(k): _fd(model, features, n, int(k), prior="learned")
                         for k in p["fd_steps"]}
    if variant in p.get("curve_variants", ()):
        test = data.load_split(config.data, "test", int(p["nll_examples"]))["image"]
        result["curve"] = curve(model, config, workdir, features, n, int(p["curve_steps"]),
                                test)
    for key in ("probe_accuracy", "probe_accuracy_at_init", "distinct_codes_train",
                "train_loss", "samples"):
        result[key] = summary.get(key)
    result["eval_seconds"] = time.time() - start
    result["train_seconds"] = (_read_json(os.path.join(workdir, "timing.json"))
                               or {}).get("train_seconds")
    result["latent_dim"] = config.model.latent_dim
    result["hardware"] = hardware()
    return result


def hardware() -> str:
    import jax
    d = jax.devices()[0]
    return (f"{jax.device_count()} x {d.device_kind} ({d.platform}), {os.cpu_count()} CPU "
            f"cores, {platform.machine()}, jax {jax.__version__}")


REPORT_ONLY_KEYS = ("sweep_variants",)  # protocol keys that choose what the report reads


def protocol_of(grid: dict) -> dict:
    """What makes two evaluations comparable: the protocol (less what only the report reads)
    and the shared budget."""
    protocol = {k: v for k, v in grid["protocol"].items() if k not in REPORT_ONLY_KEYS}
    return json.loads(json.dumps({"protocol": protocol, "common": grid["common"],
                                  "base": grid["base"]}, sort_keys=True))


def _claim(workdir: str) -> bool:
    """Takes WORKDIR/.running for this process; False while another live process holds it.

    Several copies of the same command can so share a grid (one per core or machine on a
    shared filesystem): each run is trained and evaluated by one of them.
    """
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = os.path.join(workdir, ".running")  # a local lock: it holds a process id
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(epath.Path(lock).read_text() or 0), 0)  # raises when it is gone
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                _remove(lock)  # left by a killed process: take it over
                continue
            except PermissionError:
                return False  # alive, another user's
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _remove(path: str) -> None:
    epath.Path(path).unlink(missing_ok=True)


def _stored(grid: dict, root: str, store: Optional[str], variant: str, seed: int):
    """The run's evaluation under this grid's protocol, from its workdir or the store."""
    for path in (os.path.join(workdir_of(root, variant, seed), "ablation.json"),
                 store and os.path.join(store, f"{variant}-seed{seed}.json")):
        stored = path and _read_json(path)
        if stored and stored.get("protocol") == protocol_of(grid):
            return stored
    return None


def run_grid(grid: dict, root: str, store: Optional[str] = None) -> dict:
    """Trains and evaluates every run not done yet; returns {(variant, seed): result}.

    store: a folder (kept in git beside the report) that holds a copy of every run's
    evaluation, VARIANT-seedS.json; a run found there is done even when its workdir is gone.
    A run that another live process is working on (see `_claim`) is left to it and is
    missing from the returned results."""
    check_grid(grid)
    features, results = Features(grid), {}
    for variant, seed in runs_of(grid):
        workdir = workdir_of(root, variant, seed)
        path = os.path.join(workdir, "ablation.json")
        stored = _stored(grid, root, store, variant, seed)
        if stored:
            logging.info("Skip %s: evaluated", workdir)
            results[variant, seed] = stored
            continue
        if not _claim(workdir):
            logging.info("Skip %s: another process is running it", workdir)
            continue
        try:
            config = run_config(grid, variant, seed)
            train_run(config, workdir)
            result = evaluate_run(grid, variant, seed, config, workdir, features)
            result["protocol"] = protocol_of(grid)
            result["fd_features"] = features.get()[0]
            _write_json(path, result)
            if store:
                epath.Path(store).mkdir(parents=True, exist_ok=True)
                _write_json(os.path.join(store, f"{variant}-seed{seed}.json"), result)
            results[variant, seed] = result
        finally:
            _remove(os.path.join(workdir, ".running"))
    return results


def stored_results(grid: dict, root: str, store: Optional[str] = None) -> dict:
    """{(variant, seed): evaluation} of the runs evaluated under this grid's protocol
    (from the workdirs, else from the store; see `run_grid`)."""
    out = {}
    for variant, seed in runs_of(grid):
        stored = _stored(grid, root, store, variant, seed)
        if stored:
            out[variant, seed] = stored
    return out


def command_of(grid_path: str, root: str, results_path: str) -> str:
    return (f"python experiments/ablations.py --grid={grid_path} --root={root} "
            f"--results={results_path}")


def main(argv):
    del argv
    if not FLAGS.grid or not FLAGS.root:
        raise app.UsageError("--grid and --root are required")
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.root, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from experiments import report
    store = os.path.join(os.path.splitext(FLAGS.results)[0], "runs")
    try:
        grid = load_grid(FLAGS.grid)
        if not FLAGS.report_only:
            run_grid(grid, FLAGS.root, store)
    except GridError as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 2
    results = stored_results(grid, FLAGS.root, store)
    for (variant, seed), result in results.items():  # runs evaluated before the store existed
        epath.Path(store).mkdir(parents=True, exist_ok=True)
        _write_json(os.path.join(store, f"{variant}-seed{seed}.json"), result)
    report.write_report(grid, results, FLAGS.results,
                        command_of(FLAGS.grid, FLAGS.root, FLAGS.results))
    print(f"Wrote {FLAGS.results}")
    return 0


if __name__ == "__main__":
    app.run(main)
