"""The device grid's runner (experiments/device_run.py): its tiny variant end to end on CPU in
a subprocess where TensorFlow cannot be imported (the device has none): a SIGTERM after the
first run (as `timeout` sends it on the device) must leave that run's report, and a rerun
must finish the grid without redoing it; a budget spent before any run still writes the
report. Then the planner, and the numpy data against dmz_jax's pipeline."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import COMPILE_CACHE, ROOT, subprocess_env, tiny_config
from experiments import device_data, device_run

RUNNER = os.path.join(ROOT, "experiments", "device_run.py")
# Runs the runner as if TensorFlow were not installed (importlib.util.find_spec gives None,
# `import` raises), then prints the TensorFlow modules loaded (none, or it would have failed).
WITHOUT_TENSORFLOW = f"""
import runpy, sys
BLOCKED = ("tensorflow", "tensorflow_datasets")
for name in BLOCKED:
    sys.modules[name] = None
try:
    runpy.run_path({RUNNER!r}, run_name="__main__")
finally:
    print("TENSORFLOW_MODULES", sorted(m for m, v in sys.modules.items()
                                       if m.split(".")[0] in BLOCKED and v is not None))
"""


def _command(out, *flags):
    return [sys.executable, "-c", WITHOUT_TENSORFLOW, f"--out={out}", "--tiny", *flags]


def _check(returncode, stdout):
    assert returncode == 0, stdout[-4000:]
    assert "TENSORFLOW_MODULES []" in stdout, stdout[-4000:]


def _run(out, *flags, timeout=400):
    proc = subprocess.run(_command(out, *flags), cwd=ROOT, env=subprocess_env(COMPILE_CACHE),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    _check(proc.returncode, proc.stdout)
    return proc.stdout


def _run_until_first_run_then_sigterm(out, *flags):
    """The runner, sent SIGTERM once its first run's result is stored; its output."""
    proc = subprocess.Popen(_command(out, *flags), cwd=ROOT, env=subprocess_env(COMPILE_CACHE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, deadline = os.path.join(out, "runs", "dmz-seed0.json"), time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=120)[0]
    _check(proc.returncode, stdout)
    return stdout


def _report(out):
    with open(os.path.join(out, "results_gpu.md")) as f:
        return f.read()


def _progress(out):
    with open(os.path.join(out, "progress.json")) as f:
        return json.load(f)


@pytest.mark.slow  # two tiny runs and the float32 benchmarks at -O0: about 1.5 minutes
def test_tiny_device_grid_sigterm_then_rerun_without_tensorflow(tmp_path):
    out = str(tmp_path / "device")
    _run_until_first_run_then_sigterm(out, "--bench_s=0")
    text, runs = _report(out), _progress(out)["runs"]
    assert runs["dmz/seed0"]["status"] == "done" and "| `dmz` |" in text  # kept
    second = runs.get("no_z/seed0", {}).get("status")  # stopped, unless already finished
    assert ("Stopped early" in text and second in (None, "stopped by a signal")
            ) or "2 of 2 evaluated" in text
    with open(os.path.join(out, "runs", "dmz-seed0.json")) as f:
        dmz = json.load(f)

    stdout = _run(out, "--calls=1", "--rounds=1", "--bench_s=300", "--bench_dtypes=float32")
    assert "run dmz/seed0" not in stdout  # stored: not run again
    with open(os.path.join(out, "runs", "dmz-seed0.json")) as f:
        assert json.load(f) == dmz
    text = _report(out)
    assert "Runs**: 2 of 2 evaluated." in text
    for variant in ("dmz", "no_z"):  # a row per arm in the runs table
        assert f"| `{variant}` |" in text
    assert set(dmz["fd"]) == {"ancestral", "ddim"} and set(dmz["fd"]["ddim"]) == {"2", "5"}
    assert [c["step"] for c in dmz["curve"]] == [2, 4]  # FD along training, every 2 steps
    assert dmz["curve"][-1]["fd_K2"] == dmz["fd"]["ancestral"]["2"]
    assert 0 < dmz["fd"]["ancestral"]["2"] < 1e4 and 0 <= dmz["probe_accuracy"] <= 1
    assert os.path.exists(os.path.join(out, "results_gpu", "samples_dmz.png"))
    with open(os.path.join(out, "benchmarks_gpu.md")) as f:
        bench = f.read()
    for what in ("full train step", "U-Net forward", "sampling, K=10"):
        assert f"| dmz_jax | {what} | float32 |" in bench
    assert "reference was not measured (not installed" in bench  # no torch, diffusers here
    assert "## Benchmarks" in text and "## The device run" in text
    assert _progress(out)["runs"]["no_z/seed0"]["status"] == "done"


@pytest.mark.slow  # a process that stops before any run: a few seconds
def test_a_spent_budget_still_writes_the_report(tmp_path):
    out = str(tmp_path / "device")
    stdout = _run(out, "--budget_s=0", "--bench_s=0")
    assert "budget spent before the grid" in stdout
    assert "Runs**: 0 of 2 evaluated; not yet: dmz/seed0, no_z/seed0." in _report(out)


def _grid(estimate, **extra):
    return {"variants": {"a": {}, "b": {}}, "seeds": (0, 1), "protocol": {"ddim_variants": ("a",)},
            "estimate": estimate, **extra}


def test_a_signal_during_the_held_block_stops_after_it():
    """A run's result is stored, marked done and counted together: SIGTERM in between (here
    sent from another thread, as XLA's or orbax's threads may receive it) stops the runner
    only after the block. CI once saw the masked-thread version lose a stored run."""
    import threading
    previous = signal.signal(signal.SIGTERM, device_run._stop_on_signal)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
            with device_run._signals_held():
                sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
                sender.start()
                sender.join()
                time.sleep(0.05)  # Python runs the handler in the main thread meanwhile
                done.append("stored")
                done.append("counted")
        assert done == ["stored", "counted"]
        with device_run._signals_held():  # nothing pending: no stop
            done.append("again")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_run_order_goes_tier_by_tier_and_seed_by_seed():
    grid = _grid({}, variants={"a": {}, "b": {}, "c": {}}, order=(("a", "b"), ("c",)))
    assert device_run.run_order(grid) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("c", 0),
                                          ("c", 1)]
    assert device_run.run_order(_grid({})) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_planner_uses_the_estimate_then_the_measurements():
    planner = device_run.Planner(_grid({"first_run_s": 70.0, "next_run_s": 30.0,
                                        "ddim_extra_first_s": 20.0, "ddim_extra_next_s": 5.0}))
    assert planner.arm_s("b", 2) == 100.0  # 70 + 30
    assert planner.arm_s("a", 2) == 125.0  # DDIM: 90 + 35
    assert planner.run_s("b", first=False) == 30.0
    planner.record(first=True, seconds=50.0)
    assert planner.run_s("b", first=True) == 50.0
    assert planner.run_s("b", first=False) == 50.0  # no later seed measured: the first's
    planner.record(first=False, seconds=10.0)
    planner.record(first=False, seconds=20.0)
    assert planner.arm_s("a", 3) == 50.0 + 2 * 15.0


def test_train_batches_pair_seeds_and_cover_epochs():
    split = {"image": np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1),
             "label": np.arange(10, dtype=np.int32)}
    take = lambda seed, n: [b["label"] for _, b in zip(range(n), device_data.train_batches(
        split, 4, seed))]
    first, again, other = take(0, 5), take(0, 5), take(1, 5)
    assert all((a == b).all() for a, b in zip(first, again))  # a seed: the same order
    assert any((a != b).any() for a, b in zip(first, other))
    labels = np.concatenate(first)  # 20 rows = epochs 0 and 1, each a permutation
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))


def test_numpy_data_matches_the_pipeline():
    """device_data.load_split gives dmz_jax.data.load_split's arrays for the bundled source."""
    from dmz_jax import data
    config = tiny_config()
    for split in ("train", "test"):
        ours = device_data.load_split(config.data, split, 64)
        theirs = data.load_split(config.data, split, 64)
        assert ours["image"].shape == (64, 32, 32, 1) and ours["image"].dtype == np.float32
        np.testing.assert_array_equal(ours["image"], theirs["image"])
        np.testing.assert_array_equal(ours["label"], theirs["label"])
