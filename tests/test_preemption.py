"""Preemption: kill -9 at random moments and resume bit-exactly, SIGTERM / SIGHUP, a second
signal. A stopped run exits 75 (dmz_jax.preemption.EXIT_PREEMPTED), a finished one 0.

The fault-injection test kills real training processes; DMZ_FAULT_KILLS (default 2: one at a
random moment, one in the middle of a checkpoint write, and so on alternately) sets how many
kills it makes. The tests share one compile cache (one compile per function).
"""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY, saved_state, subprocess_env, trained_steps
from dmz_jax.preemption import EXIT_PREEMPTED



@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The persistent compile cache of this module's training processes."""
    return str(tmp_path_factory.mktemp("compile_cache"))


def _start(workdir, num_steps, cache_dir, log_path, *extra):
    cmd = [sys.executable, "-m", "dmz_jax.main", f"--config={TINY}", f"--workdir={workdir}",
           f"--config.training.num_steps={num_steps}", "--config.training.checkpoint_every=1",
           "--config.training.log_every=1", "--config.eval.at_end=False", *extra]
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(cache_dir), stdout=log,
                            stderr=subprocess.STDOUT)


def _final_state(workdir, step):
    assert max(trained_steps(workdir)) == step
    return saved_state(workdir, step)


def _wait_for(predicate, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _tmp_checkpoint_exists(workdir):
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


@pytest.mark.slow  # training subprocesses
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, compile_cache):
    steps, kills = 14, int(os.environ.get("DMZ_FAULT_KILLS", "2"))
    cache, rng = compile_cache, random.Random(0)
    reference, faulty = str(tmp_path / "reference"), str(tmp_path / "faulty")
    log = str(tmp_path / "log.txt")
    # the reference writes only its final checkpoint: the killed run's checkpoints and
    # restores must not change a bit of what it computes
    assert _start(reference, steps, cache, log,
                  f"--config.training.checkpoint_every={steps}").wait(timeout=300) == 0
    killed_mid_write = 0
    for i in range(kills):
        proc = _start(faulty, steps, cache, log)
        done_before = max(trained_steps(faulty), default=0)
        # wait until this process has trained at least one step of its own
        assert _wait_for(lambda: max(trained_steps(faulty), default=0) > done_before, proc,
                         240), open(log).read()[-3000:]
        if i % 2 == 1:  # kill while a checkpoint is being written
            killed_mid_write += _wait_for(lambda: _tmp_checkpoint_exists(faulty), proc, 60)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if max(trained_steps(faulty), default=0) >= steps:
            break
    last = str(tmp_path / "last_run.txt")  # this run's own log: the others' say the same
    assert _start(faulty, steps, cache, last).wait(timeout=300) == 0
    assert "Restored checkpoint at step" in open(last).read()
    want, got = _final_state(reference, steps), _final_state(faulty, steps)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    if kills >= 2:
        assert killed_mid_write >= 1


@pytest.mark.slow  # training subprocesses
def test_second_signal_exits_at_once_then_sigterm_checkpoints_the_resumed_step_and_exits_75(
        tmp_path, compile_cache):
    """SIGHUP (the ssh session a TPU VM's shutdown closes) and a second signal: exit at once,
    leaving a loadable checkpoint. The rerun restores it, and SIGTERM (preemption notice,
    SLURM's time limit) writes a checkpoint of the step reached and exits 75."""
    workdir, log, cache = str(tmp_path / "work"), str(tmp_path / "log.txt"), compile_cache
    proc = _start(workdir, 10, cache, log)
    assert _wait_for(lambda: len(trained_steps(workdir)) >= 2, proc, 240), \
        open(log).read()[-3000:]
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # long before the 2 steps the first one needs
    rc = proc.wait(timeout=120)
    assert rc == 128 + signal.SIGINT, open(log).read()[-3000:]
    text = open(log).read()
    assert "Signal 1: finishing this step, checkpointing and exiting" in text
    assert "Second signal 2: exiting now without a checkpoint" in text
    before = max(trained_steps(workdir))

    resumed = str(tmp_path / "resumed.txt")  # the rerun's own log; num_steps may change
    proc = _start(workdir, 10_000, cache, resumed, "--config.training.checkpoint_every=1000")
    assert _wait_for(lambda: b" loss=" in open(resumed, "rb").read(), proc, 240), \
        open(resumed).read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, open(resumed).read()[-3000:]
    text = open(resumed).read()
    assert f"Restored checkpoint at step {before}" in text and "cannot be loaded" not in text
    assert f"Signal {int(signal.SIGTERM)}: finishing this step, checkpointing and exiting" in text
    stopped = max(trained_steps(workdir))
    assert before < stopped < 1000  # the current step, not a periodic one
    assert f"Stopped at step {stopped} after a signal" in text
