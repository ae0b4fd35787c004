"""Two processes on one machine, as on two hosts: JAX's CPU collectives (gloo) between two
`python -m dmz_jax.main --coordinator=localhost:PORT --num_processes=2 --process_id=I` runs,
one CPU device each, with the default data pipeline (each process reads its rows of the
job's global batch).

One test, two starts of the pair (each costs about a minute of compiling on 2 cores:
XLA:CPU recompiles a cached multi-process executable at its first call):
1. a fresh pair checkpoints every step; process 1 is killed (-9) and process 0, left
   alone, exits 76 (dmz_jax.preemption.EXIT_PEER_LOST) by itself within --peer_timeout +
   60 s, naming process 1;
2. the newest checkpoint is moved away and the pair restarted; SIGTERM to process 1 while
   it is still restoring or compiling: both train to the same step, checkpoint it and exit
   75 (EXIT_PREEMPTED), having recomputed the moved step bit for bit; the parameters they
   stopped with (trained by two processes across a kill and two restores) are those of one
   process on 1 device at that step (float32 round-off of the all-reduce; 1 device = 8
   devices is tests/test_train.py's test_data_fsdp_and_mixed_meshes_match_one_device, on
   the same data pipeline). That a stopped pair resumes is part 2's own restore.
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
from dmz_jax import checkpointing, preemption, sharding, train
from dmz_jax import train_state as ts
from dmz_jax.model import create_model

pytestmark = pytest.mark.slow  # training subprocesses

STEPS = 16  # batch 8 (the tiny config): 4 examples per process per step


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


def _one_process_params(workdir, steps: int):
    """The params after `steps` steps of one process on 1 device, default data. (1 device and
    8 devices, data- and fsdp-sharded, on the same default pipeline: tests/test_train.py's
    test_data_fsdp_and_mixed_meshes_match_one_device.)"""
    config = tiny_config()
    config.training.update(num_steps=steps, checkpoint_every=steps)
    config.eval.at_end = False
    run = train.Run(config, workdir, mesh=sharding.create_mesh(devices=jax.devices()[:1]))
    state, _, _ = train.train(run, run.initial_state())
    run.close()
    return jax.device_get(state.params)


def _wait_for(predicate, procs, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        assert all(p.poll() is None for p in procs), "\n".join(t[-3000:] for t in _logs(log))
        time.sleep(0.02)
    assert predicate(), "\n".join(t[-3000:] for t in _logs(log))


def _fail(log):
    return "\n".join(t[-3000:] for t in _logs(log))


def test_two_processes_lose_one_stop_together_resume_exactly_and_train_like_one(
        cache, tmp_path):
    workdir = str(tmp_path / "work")
    steps = f"--config.training.num_steps={STEPS}"

    # 1. kill -9 of process 1 after a few checkpoints; process 0 is left alone and must end
    # itself, non-zero, naming process 1
    log = str(tmp_path / "run1_")
    procs = _start_pair(workdir, cache, log, steps, "--config.training.checkpoint_every=1",
                        "--peer_timeout=10")
    _wait_for(lambda: max(trained_steps(workdir), default=0) >= 3, procs, log)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    procs[1].wait()
    assert procs[0].wait(timeout=10 + 60) == preemption.EXIT_PEER_LOST, _fail(log)
    print(f"process 0 exited {time.time() - killed:.1f} s after process 1 was killed")
    assert "Process 1 of 2 stopped answering" in _logs(log)[0], _fail(log)
    killed_at = max(trained_steps(workdir))
    assert 3 <= killed_at < STEPS - 4

    # 2. the newest checkpoint moved away, the pair restarts from the one before; SIGTERM to
    # process 1 while it restores or compiles (before any step ran): both stop at the same
    # later step with a checkpoint, exit 75, and wrote the moved step again bit for bit
    uninterrupted = _saved_state(workdir, killed_at)
    shutil.move(os.path.join(workdir, "checkpoints", str(killed_at)), str(tmp_path / "moved"))
    log = str(tmp_path / "run2_")
    procs = _start_pair(workdir, cache, log, steps, "--config.training.checkpoint_every=1",
                        "--config.training.keep_checkpoints=100")
    _wait_for(lambda: "Restored checkpoint" in _logs(log)[1], procs, log)
    assert not any(" loss=" in t for t in _logs(log)), "signal came too late: " + _fail(log)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait_all(procs) == [preemption.EXIT_PREEMPTED] * 2, _fail(log)
    assert all(f"Restored checkpoint at step {killed_at - 1} " in t for t in _logs(log))
    stops = [re.findall(r"Stopped at step (\d+) after a signal", t) for t in _logs(log)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stop = int(stops[0][0])
    assert killed_at <= stop < STEPS and max(trained_steps(workdir)) == stop
    for a, b in zip(jax.tree.leaves(uninterrupted),
                    jax.tree.leaves(_saved_state(workdir, killed_at))):
        np.testing.assert_array_equal(a, b)

    # ... with the parameters of one process on 1 device at that step (the all-reduces
    # differ: gloo over two processes, none on one device: float32 round-off)
    got = _saved_state(workdir, stop)
    want = _one_process_params(str(tmp_path / "one_process"), stop)
    assert int(got.step) == stop
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got.params)):
        # atol 1% of one Adam step (lr 1e-3): see test_train's mesh test (seen: 1 of 6,912
        # elements 1.75e-6 apart on another CPU)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
