"""The device grid in one command, start to finish within a wall-clock budget (8 minutes on
one H100 by estimate: experiments/grids/device.py), with no TensorFlow anywhere on its path.

    python experiments/device_run.py --out=DIR            # the device grid
    python experiments/device_run.py --out=DIR --tiny     # its tiny variant: CPU, 40 s-2 min

What it does, in order, writing DIR as it goes:
  1. benchmarks (at most --bench_s seconds from the start): dmz_jax's full train step at the
     grid's batch, the U-Net forward and a K=10 sampling loop, float32 then bfloat16, and the
     diffusers reference in the same process when torch and diffusers both import (else
     dmz_jax alone, saying why) -> DIR/benchmarks_gpu.md (the rows also in progress.json);
  2. the grid (experiments/grids/device.py): its runs tier by tier, each trained by a loop of
     dmz_jax.train_state's jitted step on numpy batches of the bundled Fashion-MNIST
     (experiments/device_data.py) and evaluated through dmz_jax.inference (FD in the features
     of dmz_jax.metrics.classifier, linear probe, trained and untrained); an arm starts only
     when all its seeds are predicted to fit before --budget_s; after every run
     DIR/runs/VARIANT-seedS.json, DIR/progress.json and the report are rewritten, so a cut-off
     run leaves the report of the runs before it;
  3. DIR/results_gpu.md (experiments/report.py's renderer, plus the benchmarks, the plan
     against what was measured, and the environment), its PNGs in DIR/results_gpu/: copy
     both into docs/.
--budget_s (default 450) is the deadline of steps 1-2 in seconds from the start of the
process: the run that would end after it is not started, the run in progress when it passes
is abandoned; the report follows in a few seconds, so the whole command ends within ~8
minutes. SIGTERM or SIGINT (e.g. `timeout -s TERM`) also stop it, with the report written.
Rerunning with the same --out skips the runs already stored there.

On a device session (docs/device_grid.md), here first:

    echo /.whl/ >> .git/info/exclude
    .venv/bin/pip download --no-deps -d .whl ml-collections==1.1.0 clu==0.0.12

then one `run` with carry [".whl"], timeout_s 560 and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      || exit; timeout -k 5 470 python3 experiments/device_run.py --out=/tmp/dr 2>&1 \
      | tee /tmp/dr.log; cp /tmp/dr/results_gpu.md /tmp/dr/benchmarks_gpu.md /tmp/dr.log \
      $OUT/; tar czf $OUT/device_run.tgz -C /tmp dr
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import signal
import sys
import time
from typing import Any, Optional

START = time.time()  # the budget counts from here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python experiments/device_run.py` from anywhere
    sys.path.insert(0, ROOT)

GRID = os.path.join(ROOT, "experiments", "grids", "device.py")


class OutOfBudget(Exception):
    """The deadline passed during a run: the run is abandoned."""


def say(message: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Folder of the results and the report.")
    p.add_argument("--tiny", action="store_true", help="The grid's tiny variant (tests).")
    p.add_argument("--grid", default=GRID, help="A grid file with get_grid(variant).")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="Deadline of benchmarks + grid, seconds from the process start.")
    p.add_argument("--bench_s", type=float, default=60.0,
                   help="Deadline of the benchmarks, seconds from the start; 0: none.")
    p.add_argument("--calls", type=int, default=5, help="Benchmark calls per round.")
    p.add_argument("--rounds", type=int, default=3, help="Benchmark rounds (median, min).")
    p.add_argument("--bench_dtypes", default="float32,bfloat16",
                   help="model.dtype values of the benchmark rows, in order.")
    return p.parse_args(argv)


_HELD = {"depth": 0, "pending": None}  # _signals_held's state


def _stop_on_signal(signum, frame):
    if _HELD["depth"]:
        _HELD["pending"] = signum  # raised when the held block ends
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_held():
    """SIGTERM/SIGINT wait for the end of the block (then stop as usual). Masking the signals
    (pthread_sigmask) would not do: it holds them off the main thread only, and a signal
    delivered to any other thread (XLA's, orbax's) still runs this handler in the main
    thread at once."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
    if not _HELD["depth"] and _HELD["pending"] is not None:
        signum, _HELD["pending"] = _HELD["pending"], None
        raise KeyboardInterrupt(f"signal {signum}")


# --- the grid


def load_grid(path: str, variant: str) -> dict:
    """get_grid(variant) of the grid file, checked as experiments/ablations.py checks grids."""
    from experiments import ablations
    spec = importlib.util.spec_from_file_location("device_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = dict(module.get_grid(variant), path=os.path.relpath(path, ROOT))
    missing = {"name", "base", "common", "seeds", "variants", "protocol"} - set(grid)
    unknown = set(grid.get("protocol", {})) - set(ablations.PROTOCOL_KEYS)
    if missing or unknown:
        raise ablations.GridError(f"{path}: lacks {sorted(missing)}, unknown protocol keys "
                                  f"{sorted(unknown)}")
    ablations.check_grid(grid)  # every run's config through dmz_jax.config_checks
    return grid


def run_order(grid: dict) -> list:
    """(variant, seed) in running order: tier by tier (grid["order"], default one tier of
    every variant), each tier seed by seed."""
    tiers = grid.get("order") or (tuple(grid["variants"]),)
    return [(v, int(s)) for tier in tiers for s in grid["seeds"] for v in tier]


class Planner:
    """Predicts a run's seconds: the grid's estimate until runs are measured, then the mean
    of the measured first-seed (compiles included) and later-seed runs."""

    def __init__(self, grid: dict):
        self.grid, self.estimate = grid, grid.get("estimate", {})
        self.measured = {"first": [], "next": []}

    def run_s(self, variant: str, first: bool) -> float:
        kind = "first" if first else "next"
        if self.measured[kind]:
            return sum(self.measured[kind]) / len(self.measured[kind])
        if not first and self.measured["first"]:
            return min(self.measured["first"])
        ddim = variant in self.grid["protocol"].get("ddim_variants", ())
        return (float(self.estimate.get(f"{kind}_run_s", 0.0))
                + (float(self.estimate.get(f"ddim_extra_{kind}_s", 0.0)) if ddim else 0.0))

    def arm_s(self, variant: str, seeds: int) -> float:
        """All `seeds` runs of an arm not started yet."""
        return self.run_s(variant, True) + (seeds - 1) * self.run_s(variant, False)

    def record(self, first: bool, seconds: float) -> None:
        self.measured["first" if first else "next"].append(seconds)


# --- training


@dataclasses.dataclass
class Arm:
    """What every seed of one variant shares: the model and its compiled functions."""

    config: Any  # the first seed's config
    model: Any
    diff: Any
    tx: Any
    mesh: Any
    shardings: Any  # of the TrainState
    step: Any  # the jitted train step
    compiled: Any = None  # its executable, after the first seed's first batch
    compile_s: Optional[float] = None
    center: Any = None  # jitted train_state.center_encoder_logits


def build_arm(config, mesh) -> Arm:
    import jax
    from dmz_jax import sharding
    from dmz_jax import train_state as ts
    from dmz_jax.model import create_model
    model, diff, tx = create_model(config), ts.make_diffusion(config), ts.make_optimizer(
        config.training)
    init = functools.partial(ts.create_train_state, config, model, tx)
    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    step = ts.compile_train_step(config, model, diff, tx, mesh, shardings)
    center = jax.jit(functools.partial(ts.center_encoder_logits, model),
                     out_shardings=shardings.params)
    return Arm(config, model, diff, tx, mesh, shardings, step, center=center)


def fresh_state(arm: Arm, config):
    """The state a run of `config` (this arm, its own seed) starts from: create_train_state,
    then the encoder's logits centred on the first model.encoder.center_examples training
    images (what dmz_jax.baseline.start_from does, with the numpy data)."""
    import jax
    from dmz_jax import train_state as ts
    from experiments import device_data
    init = functools.partial(ts.create_train_state, config, arm.model, arm.tx)
    state = jax.jit(init, out_shardings=arm.shardings)()
    n = config.model.encoder.center_examples
    if arm.model.uses_latent and n:
        images = device_data.load_split(config.data, "train", n)["image"]
        params = arm.center(state.params, images)
        state = state.replace(params=params, ema_params=jax.jit(ts.copy_tree)(params))
    return jax.device_put(state, arm.shardings)


def compile_step(arm: Arm, state, batch) -> None:
    """The arm's executable for this state and batch, compiled once (timed)."""
    from experiments import device_bench
    if arm.compiled is None:
        arm.compiled, arm.compile_s = device_bench.compiled_with_time(arm.step, state, batch)


def train(arm: Arm, config, state, split: dict, deadline: float, at_checkpoint=None):
    """Trains `state` for training.num_steps on `split` (device_data batches, the run's
    seed); every training.log_every steps reads the window's mean loss, checks the
    non-finite streak and the deadline (OutOfBudget); at every training.checkpoint_every
    step before the last calls at_checkpoint(step, state). Returns (state, last mean loss,
    seconds outside at_checkpoint)."""
    import jax
    from dmz_jax import sharding
    from experiments import device_data
    tc = config.training
    batches = sharding.prefetch_to_mesh(device_data.train_batches(
        split, tc.batch_size, config.seed, config.data.random_flip), arm.mesh)
    start, aside, window, loss = time.time(), 0.0, None, None
    for step in range(1, tc.num_steps + 1):
        batch = next(batches)
        compile_step(arm, state, batch)
        state, out = arm.compiled(state, batch)
        window = out["metrics"] if window is None else window.merge(out["metrics"])
        if step % tc.log_every == 0 or step == tc.num_steps:
            loss, window = float(window.compute()["loss"]), None
            if int(out["nonfinite_streak"]) >= tc.max_nonfinite_steps:
                raise FloatingPointError(f"{tc.max_nonfinite_steps} non-finite steps in a row")
            if time.time() > deadline:
                raise OutOfBudget(f"deadline passed at step {step}")
        if at_checkpoint and step % tc.checkpoint_every == 0 and step < tc.num_steps:
            jax.block_until_ready(state)
            t = time.time()
            at_checkpoint(step, state)
            aside += time.time() - t
    jax.block_until_ready(state)
    return state, loss, time.time() - start - aside


# --- evaluation


class Features:
    """The FD features (a classifier trained once on the train split, seed 0) and the real
    images' statistics (the first fd_num_samples training images)."""

    def __init__(self, protocol: dict, train: dict, test: dict):
        from dmz_jax.metrics import classifier, frechet
        self.params = classifier.train_classifier(train["image"], train["label"],
                                                  int(protocol["classifier_steps"]), 0)
        self.test_accuracy = classifier.accuracy(self.params, test["image"], test["label"])
        n = int(protocol["fd_num_samples"])
        self.real = frechet.feature_statistics(self.fn(train["image"][:n]))

    def fn(self, images):
        from dmz_jax.metrics import classifier
        return classifier.features(self.params, images)


def frechet_distance(model, features: Features, n: int, k: int, seed: int, method: str,
                     keep: Optional[list] = None) -> float:
    """FD of n samples at K = k against the real statistics, as
    dmz_jax.evaluate.sample_statistics draws them (z from the prior, image j being row j of
    `seed`'s stream, 10 batches per call); keep: a list that receives the first call's
    samples. (evaluate itself is not imported: it pulls orbax, which this path never needs.)"""
    from dmz_jax.metrics import frechet
    chunk, stats = 10 * model.batch_size, frechet.RunningStatistics(features.real[0].shape[0])
    for first in range(0, n, chunk):
        images = model.sample(min(chunk, n - first), steps=k, seed=seed, method=method,
                              first=first)
        if keep is not None and not keep:
            keep.append(images)
        stats.update(features.fn(images))
    return float(frechet.frechet_distance(*stats.statistics(), *features.real))


def probe(model, config, train: dict, test: dict) -> tuple:
    """(probe accuracy, distinct train codes) of the deterministic codes of `model`:
    logistic regression on standardised codes, train split -> test split."""
    import numpy as np
    from dmz_jax.metrics import probes
    m = model.with_batch_size(config.eval.encode_batch_size)
    codes = m.encode(train["image"]), m.encode(test["image"])
    accuracy = probes.linear_probe_accuracy(codes[0], train["label"], codes[1], test["label"])
    return accuracy, int(len(np.unique(codes[0], axis=0)))


def save_grid_png(images, path: str) -> str:
    """A grid of at most 64 images [N, H, W, 1] in [-1, 1] as a PNG (matplotlib, no TF)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dmz_jax import images as images_lib
    grid = images_lib.make_grid(images_lib.to_uint8(images[:64]))
    plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0,
               vmax=255)
    return path


def evaluate_run(grid: dict, variant: str, seed: int, config, arm: Arm, state, start,
                 data: dict, features: Features, sample_path: str, deadline: float) -> dict:
    """The protocol on a trained state (EMA parameters); start: the (params, batch_stats) it
    started from, the probe's untrained baseline. Checks the deadline between FDs."""
    from dmz_jax import inference
    p, n = grid["protocol"], int(grid["protocol"]["fd_num_samples"])
    model = inference.Inference(config, arm.model, arm.diff, state.ema_params, arm.mesh,
                                state.batch_stats, config.sampling.batch_size)
    methods = ["ancestral"] + (["ddim"] if variant in p.get("ddim_variants", ()) else [])
    fd, kept = {m: {} for m in methods}, []
    for method in methods:
        for k in p["fd_steps"]:
            if time.time() > deadline:
                raise OutOfBudget(f"deadline passed before FD {method} K={k}")
            fd[method][str(k)] = frechet_distance(model, features, n, int(k), seed, method,
                                                  kept if method == "ancestral" else None)
    result = {"variant": variant, "seed": seed, "step": int(state.step), "fd": fd,
              "samples": [save_grid_png(kept[0], sample_path)] if kept else [],
              "latent_dim": config.model.latent_dim, "probe_accuracy": None,
              "probe_accuracy_at_init": None, "distinct_codes_train": None}
    if arm.model.uses_latent:
        result["probe_accuracy"], result["distinct_codes_train"] = probe(
            model, config, data["probe_train"], data["test"])
        result["probe_accuracy_at_init"] = probe(model.with_params(*start), config,
                                                 data["probe_train"], data["test"])[0]
    return result


def run_one(grid: dict, variant: str, seed: int, arm: Arm, data: dict, features: Features,
            out: str, deadline: float) -> dict:
    """Trains and evaluates one run; returns its result (what the report reads)."""
    import jax
    from dmz_jax import inference
    from dmz_jax import train_state as ts
    from experiments import ablations
    config = ablations.run_config(grid, variant, seed)
    p, curve, curve_s = grid["protocol"], [], [0.0]
    state = fresh_state(arm, config)
    start = jax.jit(ts.copy_tree)((state.params, state.batch_stats))
    k_curve = int(p.get("curve_steps", p["fd_steps"][0]))

    def at_checkpoint(step, state):  # claim 5's FD along training (EMA parameters)
        t = time.time()
        model = inference.Inference(config, arm.model, arm.diff, state.ema_params, arm.mesh,
                                    state.batch_stats, config.sampling.batch_size)
        curve.append({"step": step, f"fd_K{k_curve}": frechet_distance(
            model, features, int(p["fd_num_samples"]), k_curve, seed, "ancestral")})
        curve_s[0] += time.time() - t

    in_curve = variant in p.get("curve_variants", ())
    state, loss, train_s = train(arm, config, state, data["train"], deadline,
                                 at_checkpoint if in_curve else None)
    t = time.time()
    sample_path = os.path.join(out, "runs", f"samples_{variant}-seed{seed}.png")
    result = evaluate_run(grid, variant, seed, config, arm, state, start, data, features,
                          sample_path, deadline)
    if in_curve and str(k_curve) in result["fd"]["ancestral"]:
        curve.append({"step": result["step"],
                      f"fd_K{k_curve}": result["fd"]["ancestral"][str(k_curve)]})
        result["curve"] = curve
    result.update(train_loss=loss, train_seconds=train_s, compile_seconds=arm.compile_s,
                  eval_seconds=time.time() - t + curve_s[0], hardware=ablations.hardware(),
                  fd_features="classifier", protocol=ablations.protocol_of(grid))
    return result


# --- the run as a whole


class Progress:
    """DIR/progress.json: the plan and what became of each run, rewritten at every change."""

    def __init__(self, out: str, grid: dict, budget_s: float):
        """A rerun into the same DIR keeps the earlier invocations' runs and benchmarks."""
        self.path = os.path.join(out, "progress.json")
        self.values = {"runs": {}, "benchmarks": None, "environment": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.values.update(json.load(f))
        self.values.pop("stopped", None)
        self.values.update(grid=grid["name"], budget_s=budget_s)

    def set(self, key: str, value) -> None:
        self.values[key] = value
        self.save()

    def run(self, variant: str, seed: int, **fields) -> None:
        self.values["runs"].setdefault(f"{variant}/seed{seed}", {}).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.values)


def write_json(path: str, values: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)  # never a half-written file


def environment(reference: str) -> dict:
    """The facts the report shows beside the figures."""
    import jax
    d = jax.devices()[0]
    return {"jax": jax.__version__, "backend": d.platform, "device": d.device_kind,
            "devices": jax.device_count(), "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "reference": reference}


def run_benchmarks(grid: dict, arms: dict, mesh, args, progress: Progress, out: str) -> list:
    """Step 1 (module docstring): the rows, each skipped once its deadline (--bench_s, at
    most --budget_s) has passed. The float32 full train step is the first arm's, compiled
    once for the benchmark and the grid."""
    from dmz_jax import sharding
    from experiments import ablations, device_bench, device_data
    deadline = START + min(args.bench_s, args.budget_s)
    variant = run_order(grid)[0][0]
    config = ablations.run_config(grid, variant, 0)
    split = device_data.load_split(config.data, "train", config.training.batch_size)
    batch = sharding.global_batch(split, mesh)
    missing, rows, last_s = device_bench.reference_missing(), [], 0.0
    for dtype in args.bench_dtypes.split(","):
        if time.time() + last_s > deadline:  # the next dtype costs about what the last did
            say(f"benchmarks: no time left for {dtype}")
            break
        started = time.time()
        c = config.copy_and_resolve_references()
        c.model.dtype = dtype
        if dtype == "float32" and variant not in arms:
            arms[variant] = build_arm(c, mesh)
        arm = arms[variant] if dtype == "float32" else build_arm(c, mesh)
        state = fresh_state(arm, c)
        compile_step(arm, state, batch)
        rows.append(device_bench.full_step_row(arm.compiled, arm.compile_s, state, batch, dtype,
                                               args.calls, args.rounds)[0])
        data = device_bench.random_inputs(c, c.sampling.batch_size)
        rows += device_bench.unet_rows(c, dtype, data, 10, args.calls, args.rounds,
                                       with_train=missing is None, deadline=deadline)
        last_s = time.time() - started
        say(f"benchmarks {dtype}: {len(rows)} rows so far, {last_s:.0f} s")
    if missing is None and time.time() <= deadline:
        try:
            data = device_bench.random_inputs(config, config.sampling.batch_size)
            rows += device_bench.torch_rows(config, data, 10, args.calls, args.rounds,
                                            args.bench_dtypes.split(","))
        except Exception as e:  # the reference must never cost the grid
            missing = f"failed: {type(e).__name__}: {e}"
    reference = ("the PyTorch diffusers reference was measured in this process"
                 if missing is None else
                 f"the PyTorch diffusers reference was not measured ({missing})")
    progress.set("benchmarks", [r.as_dict() for r in rows])
    progress.set("environment", environment(reference))
    with open(os.path.join(out, "benchmarks_gpu.md"), "w") as f:
        f.write(benchmarks_markdown(rows, grid, config, progress.values["environment"]))
    return rows


def benchmarks_markdown(rows: list, grid: dict, config, env: dict) -> str:
    """The benchmark section: device, model, and device_bench's table."""
    from experiments import device_bench
    return "\n".join([
        f"Device: {env['devices']} x {env['device']} ({env['backend']}), jax {env['jax']}, "
        f"{env['cpu_cores']} CPU cores; {env['reference']}.",
        f"Model: the grid's first arm, seed 0 (base {grid['base']}, |z| = "
        f"{config.model.latent_dim}); full train step at batch {config.training.batch_size}, "
        f"U-Net rows at the sampling batch {config.sampling.batch_size}; model.dtype = "
        "bfloat16 is bfloat16 compute over float32 parameters.", "",
        device_bench.markdown(rows) if rows else "(no row measured before --bench_s)", ""])


def load_data(grid: dict) -> dict:
    """The numpy splits every run reads (bundled Fashion-MNIST): "train" (all of it: the
    training batches, the classifier of the FD features and the first fd_num_samples real
    images), "probe_train" (its first eval.probe_train_examples) and "test" (the first
    eval.probe_test_examples)."""
    from experiments import ablations, device_data
    config = ablations.run_config(grid, next(iter(grid["variants"])), 0)
    train = device_data.load_split(config.data, "train")
    n = config.eval.probe_train_examples
    return {"train": train, "probe_train": {k: v[:n] for k, v in train.items()},
            "test": device_data.load_split(config.data, "test",
                                           config.eval.probe_test_examples)}


def stored(out: str, grid: dict) -> dict:
    """{(variant, seed): result} already in DIR/runs under this grid's protocol."""
    from experiments import ablations
    results = {}
    for variant, seed in run_order(grid):
        path = os.path.join(out, "runs", f"{variant}-seed{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            if result.get("protocol") == ablations.protocol_of(grid):
                results[variant, seed] = result
    return results


def run_grid(grid: dict, arms: dict, mesh, results: dict, progress: Progress, out: str,
             deadline: float, render) -> None:
    """Step 2 (module docstring): every run not stored yet that is predicted to fit; an
    arm's first run only when all its remaining seeds are."""
    if time.time() > deadline:
        say("budget spent before the grid")
        return
    data = load_data(grid)
    features = Features(grid["protocol"], data["train"], data["test"])
    say(f"features: classifier test accuracy {features.test_accuracy:.3f}")
    planner, order, evaluated = Planner(grid), run_order(grid), {v for v, _ in results}
    failed = set()
    for i, (variant, seed) in enumerate(order):
        if (variant, seed) in results:
            continue
        if variant in failed:
            progress.run(variant, seed, status="skipped: an earlier seed of it failed")
            continue
        first = variant not in evaluated
        seeds_left = sum(1 for v, s in order[i:] if v == variant and (v, s) not in results)
        need = planner.arm_s(variant, seeds_left) if first else planner.run_s(variant, False)
        left = deadline - time.time()
        progress.run(variant, seed, predicted_s=round(need, 1), left_s=round(left, 1))
        if need > left:
            progress.run(variant, seed, status="skipped: predicted not to fit the budget")
            say(f"skip {variant}/seed{seed}: predicted {need:.0f} s, {left:.0f} s left")
            continue
        say(f"run {variant}/seed{seed} (predicted {need:.0f} s, {left:.0f} s left)")
        result, seconds, stop = run_and_store(grid, variant, seed, arms, mesh, data, features,
                                              out, deadline, progress, results)
        if stop:
            return
        if result is None:
            failed.add(variant)
            continue
        results[variant, seed] = result
        evaluated.add(variant)
        planner.record(first, seconds)
        render()


def run_and_store(grid: dict, variant: str, seed: int, arms: dict, mesh, data: dict,
                  features: Features, out: str, deadline: float, progress: Progress,
                  results: dict):
    """(result or None, seconds as the planner counts them, whether the grid must stop) of
    one run, stored in DIR/runs and in `results` (with SIGTERM/SIGINT held off meanwhile). The deadline passing stops the grid; a run that fails (an
    exception) is recorded as failed and the grid goes on, since the device is seen once.
    The seconds of an arm's first run include the train step's compile also when the
    benchmarks did it."""
    import traceback
    from experiments import ablations
    start = time.time()
    try:
        if variant not in arms:
            arms[variant] = build_arm(ablations.run_config(grid, variant, seed), mesh)
        arm = arms[variant]
        compiled_before = arm.compiled is not None
        result = run_one(grid, variant, seed, arm, data, features, out, deadline)
    except OutOfBudget as e:
        progress.run(variant, seed, status=f"cut: {e}", seconds=round(time.time() - start, 1))
        say(f"cut {variant}/seed{seed}: {e}")
        return None, time.time() - start, True
    except KeyboardInterrupt:
        progress.run(variant, seed, status="stopped by a signal",
                     seconds=round(time.time() - start, 1))
        raise
    except Exception as e:  # noqa: BLE001 -- recorded, and the next arm may still work
        progress.run(variant, seed, status=f"failed: {type(e).__name__}: {str(e)[:300]}",
                     seconds=round(time.time() - start, 1))
        say(f"FAILED {variant}/seed{seed}:\n{traceback.format_exc()}")
        return None, time.time() - start, False
    seconds = time.time() - start
    result["fd_classifier_test_accuracy"] = features.test_accuracy
    with _signals_held():  # stored, marked done and counted together, or none of them
        write_json(os.path.join(out, "runs", f"{variant}-seed{seed}.json"), result)
        progress.run(variant, seed, status="done", seconds=round(seconds, 1),
                     train_s=round(result["train_seconds"], 1),
                     compile_s=None if arm.compile_s is None else round(arm.compile_s, 1))
        results[variant, seed] = result
    say(f"done {variant}/seed{seed} in {seconds:.0f} s: FD {result['fd']['ancestral']}, "
        f"probe {result['probe_accuracy']}")
    return result, seconds + (arm.compile_s if compiled_before and arm.compile_s else 0.0), False


def command_of(args) -> str:
    flags = " --tiny" if args.tiny else ""
    if args.budget_s != 450.0:
        flags += f" --budget_s={args.budget_s:g}"
    return f"python experiments/device_run.py --out={args.out}{flags}"


def _read(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def render(grid: dict, results: dict, progress: Progress, out: str, command: str) -> str:
    """DIR/results_gpu.md: experiments/report.py's report of the stored runs, then the device
    run's own sections (plan and outcome per run, benchmarks, environment)."""
    from experiments import report
    path = os.path.join(out, "results_gpu.md")
    report.write_report(grid, results, path, command)
    extra = ["## The device run", "",
             f"Budget: benchmarks and grid within {progress.values['budget_s']:g} s of the "
             "process start (experiments/device_run.py). Each run as planned and as it went "
             "(predicted: the grid's estimate until a run was measured, then the measured "
             "times; an arm's first run includes its compiles):", "",
             "| run | predicted s | left s | status | seconds | train s | train-step compile s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in progress.values["runs"].items():
        extra.append(f"| {name} | {r.get('predicted_s', '-')} | {r.get('left_s', '-')} | "
                     f"{r.get('status', 'not reached')} | {r.get('seconds', '-')} | "
                     f"{r.get('train_s', '-')} | {r.get('compile_s', '-')} |")
    if progress.values.get("stopped"):
        extra += ["", f"Stopped early: {progress.values['stopped']}."]
    failed = progress.values.get("benchmarks_failed")
    extra += ["", "## Benchmarks (the GPU rows of docs/benchmarks.md's kind)", "",
              _read(os.path.join(out, "benchmarks_gpu.md"))
              or (f"Failed:\n\n```\n{failed}\n```" if failed else "Not run (--bench_s 0)."),
              "", "## Environment", "", "```",
              json.dumps(progress.values["environment"], indent=1, sort_keys=True), "```", ""]
    with open(path, "a") as f:
        f.write("\n" + "\n".join(extra))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.chdir(ROOT)  # the grid's base config paths are relative to the repository
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_on_signal)
    grid = load_grid(args.grid, "tiny" if args.tiny else "")
    say(f"grid {grid['name']}: {len(run_order(grid))} runs in order, budget {args.budget_s:g} s")
    from dmz_jax import sharding
    mesh, arms = sharding.create_mesh(), {}
    progress = Progress(args.out, grid, args.budget_s)
    progress.set("environment", environment(
        progress.values["environment"].get("reference", "benchmarks not run")))
    results, command, stage = stored(args.out, grid), command_of(args), "benchmarks"
    try:
        if args.bench_s > 0 and not os.path.exists(os.path.join(args.out, "benchmarks_gpu.md")):
            try:
                run_benchmarks(grid, arms, mesh, args, progress, args.out)
            except Exception:  # noqa: BLE001 -- the grid may still run: report, go on
                import traceback
                say(f"benchmarks FAILED:\n{traceback.format_exc()}")
                progress.set("benchmarks_failed", traceback.format_exc()[-2000:])
                arms.clear()  # nothing half-built reaches the grid
        stage = "grid"
        run_grid(grid, arms, mesh, results, progress, args.out, START + args.budget_s,
                 lambda: render(grid, results, progress, args.out, command))
    except KeyboardInterrupt as e:
        say(f"stopped during the {stage}: {e or 'interrupted'}")
        progress.set("stopped", f"during the {stage}: {e or 'interrupted'}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the report is written, whatever comes
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        path = render(grid, results, progress, args.out, command)
        say(f"wrote {path}: {len(results)} of {len(run_order(grid))} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
