"""Two processes on one machine, as on two hosts: JAX's CPU collectives (gloo) between two
`python -m dmz_jax.main --coordinator=localhost:PORT --num_processes=2 --process_id=I` runs,
one CPU device each, every process feeding its own shard of the data.

One test, three runs of the pair (each start costs about a minute of compiling on 2 cores:
XLA:CPU recompiles a cached multi-process executable at its first call):
1. SIGTERM to one process stops both at the same step, with a checkpoint of that step;
2. the rerun resumes there; kill -9 of one process (then of its partner) after a later
   checkpoint;
3. the rerun recomputes the step after its checkpoint bit for bit as the uninterrupted pair
   did, and finishes with the parameters of one process (two devices) fed the same global
   batches.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, TINY, subprocess_env, tiny_config, trained_steps
from dmz_jax import checkpointing, data, sharding, train
from dmz_jax import train_state as ts
from dmz_jax.model import create_model

pytestmark = pytest.mark.slow  # training subprocesses

STEPS = 12  # batch 8 (the tiny config): 4 examples per process per step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compile cache for every process of this module: one compile per function."""
    return str(tmp_path_factory.mktemp("compile_cache"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pair(workdir, cache_dir, log_prefix, *extra):
    """Processes 0 and 1 of a 2-process run; their output goes to LOG_PREFIX{0,1}.txt.
    Checkpoints every step unless EXTRA says otherwise."""
    env = subprocess_env(cache_dir)  # one device per process
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "dmz_jax.main", f"--config={TINY}",
               f"--workdir={workdir}", f"--coordinator=localhost:{port}",
               "--num_processes=2", f"--process_id={i}",
               "--config.training.checkpoint_every=1", "--config.training.log_every=1",
               "--config.eval.at_end=False", *extra]
        log = open(f"{log_prefix}{i}.txt", "ab")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _logs(log_prefix):
    return [open(f"{log_prefix}{i}.txt").read() for i in range(2)]


def _saved_state(workdir, step):
    """The train state saved at `step`, restored onto this process's devices (a checkpoint
    written by 2 processes needs a target: its shardings name the other process's device)."""
    config = tiny_config()
    model, tx = create_model(config), ts.make_optimizer(config.training)
    abstract = checkpointing.placed(
        jax.eval_shape(lambda: ts.create_train_state(config, model, tx)),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "config")) as manager:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state


def _two_shards(real_iterator):
    """train_iterator for one process that yields what 2 processes feed together: process
    0's batch, then process 1's (the order of the devices in the mesh)."""
    def iterator(data_cfg, *, batch_size, seed, start_step=0, **_):
        shards = [real_iterator(data_cfg, batch_size=batch_size // 2, seed=seed,
                                process_index=p, process_count=2, start_step=start_step)
                  for p in range(2)]
        while True:
            parts = [next(s) for s in shards]
            yield {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    return iterator


@pytest.fixture(scope="module")
def one_process_state(tmp_path_factory):
    """The state after STEPS steps of one process on two devices, fed the global batches
    of the two processes (their shards differ: process 0's twice would not match)."""
    config = tiny_config()
    config.training.num_steps, config.eval.at_end = STEPS, False
    first, second = (next(data.train_iterator(config.data, batch_size=4, seed=config.seed,
                                              process_index=p, process_count=2))
                     for p in range(2))
    assert not np.array_equal(first["image"], second["image"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "train_iterator", _two_shards(data.train_iterator))
        run = train.Run(config, str(tmp_path_factory.mktemp("one_process")),
                        mesh=sharding.create_mesh(devices=jax.devices()[:2]))
        state, _, _ = train.train(run, run.initial_state())
        run.close()
    return jax.device_get(state)


def _wait_for(predicate, procs, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        assert all(p.poll() is None for p in procs), "\n".join(t[-3000:] for t in _logs(log))
        time.sleep(0.02)
    assert predicate(), "\n".join(t[-3000:] for t in _logs(log))


def test_two_processes_stop_together_resume_exactly_and_train_like_one(
        one_process_state, cache, tmp_path):
    workdir, log = str(tmp_path / "work"), str(tmp_path / "log")
    steps = f"--config.training.num_steps={STEPS}"

    # 1. SIGTERM to process 1 once both have trained a step: both stop at the same step
    procs = _start_pair(workdir, cache, log, steps, "--config.training.checkpoint_every=1000")
    _wait_for(lambda: all(" loss=" in t for t in _logs(log)), procs, log)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait_all(procs) == [0, 0], "\n".join(t[-3000:] for t in _logs(log))
    stops = [re.findall(r"Stopped at step (\d+) after a signal", t) for t in _logs(log)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stop = int(stops[0][0])
    assert 0 < stop < STEPS and trained_steps(workdir) == [stop]  # the stop step alone

    # 2. the rerun resumes at that step; kill -9 after its next checkpoint
    procs = _start_pair(workdir, cache, log, steps, "--config.training.checkpoint_every=1")
    _wait_for(lambda: max(trained_steps(workdir)) > stop, procs, log)
    procs[1].send_signal(signal.SIGKILL)  # one host dies; its partner is then stopped too
    procs[1].wait()
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    killed_at = max(trained_steps(workdir))
    assert stop < killed_at < STEPS
    assert all(f"Restored checkpoint at step {stop} " in t for t in _logs(log))

    # 3. the rerun finishes. Exactness of the resume: the newest checkpoint (killed_at) is
    # moved away first, so the rerun recomputes that step from the one before, and must
    # write the same state bit for bit as the uninterrupted pair did.
    uninterrupted = _saved_state(workdir, killed_at)
    shutil.move(os.path.join(workdir, "checkpoints", str(killed_at)), str(tmp_path / "moved"))
    procs = _start_pair(workdir, cache, log, steps, "--config.training.keep_checkpoints=100")
    assert _wait_all(procs) == [0, 0], "\n".join(t[-3000:] for t in _logs(log))
    restored = [re.findall(r"Restored checkpoint at step (\d+) ", t)[-1] for t in _logs(log)]
    assert restored[0] == restored[1] == str(killed_at - 1)
    for a, b in zip(jax.tree.leaves(uninterrupted),
                    jax.tree.leaves(_saved_state(workdir, killed_at))):
        np.testing.assert_array_equal(a, b)
    # and the whole run: the parameters of one process fed the same global batches (the
    # all-reduce differs between gloo and one process's devices: float32 round-off)
    got = _saved_state(workdir, STEPS)
    assert int(got.step) == STEPS
    for a, b in zip(jax.tree.leaves(one_process_state.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
