"""A corrupt chunk that only one of two processes reads: both end the same way, no hang.

Two real processes (JAX's CPU collectives between them, tests/multihost_restore_worker.py)
save a state split over both (each holds half of every array), then process 1's data files
of the newest step are truncated. Process 0 reads its half fine, process 1 cannot: both must
agree that the step is corrupt, move it aside (process 0 moves it) and restore the step
before, instead of waiting in different collectives.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, subprocess_env

pytestmark = pytest.mark.slow  # two subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(argv_of, log_prefix):
    """(exit codes, outputs) of two processes, argv_of(i, port) each, logged to
    LOG_PREFIX{0,1}.txt; any still running after 120 s is killed."""
    env, port = subprocess_env(os.path.dirname(log_prefix) + "/cache"), str(_free_port())
    logs = [f"{log_prefix}{i}.txt" for i in range(2)]
    procs = [subprocess.Popen(argv_of(i, port), cwd=ROOT, env=env, stdout=open(logs[i], "wb"),
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [open(log).read() for log in logs]


def _run_pair(mode, workdir, tmp_path):
    """(exit codes, outputs) of the two worker processes in `mode`."""
    worker = os.path.join(ROOT, "tests", "multihost_restore_worker.py")
    return _run_two(lambda i, port: [sys.executable, worker, mode, port, str(i), workdir],
                    str(tmp_path / mode))


def test_a_chunk_one_process_reads_is_corrupt_for_both(tmp_path):
    workdir = str(tmp_path / "work")
    codes, texts = _run_pair("save", workdir, tmp_path)
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    start = time.time()
    codes, texts = _run_pair("restore", workdir, tmp_path)
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert time.time() - start < 120  # no process waited in a collective the other skipped
    results = [[line for line in t.splitlines() if line.startswith("RESULT")] for t in texts]
    assert results[0] == results[1] == ["RESULT step=1 w=1.0"], results
    assert "Checkpoint at step 2 cannot be loaded" in texts[0]
    assert os.listdir(os.path.join(workdir, "checkpoints_corrupt"))[0].startswith("2-")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]


def test_a_workdir_the_processes_do_not_share_is_refused_by_both(tmp_path):
    """Two processes given different --workdir folders (as two hosts with local disks):
    both refuse before training, exit 2, naming the process that cannot read the token."""
    codes, texts = _run_two(lambda i, port: [
        sys.executable, "-m", "dmz_jax.main", f"--config={TINY}",
        f"--workdir={tmp_path / f'host{i}'}", f"--coordinator=localhost:{port}",
        "--num_processes=2", f"--process_id={i}"], str(tmp_path / "refuse"))
    assert codes == [2, 2], "\n".join(t[-3000:] for t in texts)
    for text in texts:
        assert "is not shared by the 2 processes: process(es) 1 cannot read" in text
        assert " loss=" not in text
    assert not os.path.exists(tmp_path / "host0" / "checkpoints" / "1")
