"""The checkpoint failure policy of `checkpointing.restore_latest`.

Only provably corrupt checkpoints are moved aside (never deleted); any other failure raises
CheckpointRestoreError and leaves every checkpoint in place; resumable keys (learning rate,
warm-up, clipping) may change and are logged; with several processes, process 0 decides and
the others follow. The checkpoints here hold a small stand-in state saved with the tiny
config (nothing is trained or compiled); tests/test_reliability.py covers the real ones.
"""

import errno
import glob
import logging
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils

from conftest import saved_state
from dmz_jax import checkpointing


def _state(step):
    return {"step": jnp.int32(step), "w": jnp.full((64, 64), step, jnp.float32)}


@pytest.fixture
def workdir(tmp_path, tiny):
    """A workdir with checkpoints at steps 1 and 2 (the stand-in state, the tiny config)."""
    with checkpointing.create_manager(str(tmp_path), 3) as manager:
        for step in (1, 2):
            checkpointing.save(manager, step, _state(step), tiny)
        manager.wait_until_finished()
    return str(tmp_path)


def _restore(workdir, config):
    with checkpointing.create_manager(workdir, 3) as manager:
        return checkpointing.restore_latest(manager, jax.eval_shape(lambda: _state(0)), config)


def _steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _corrupt_moved(workdir):
    path = os.path.join(workdir, "checkpoints_corrupt")
    return sorted(d.split("-")[0] for d in os.listdir(path)) if os.path.isdir(path) else []


def _truncate(pattern):
    for path in glob.glob(pattern, recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)


CORRUPTIONS = {
    "truncated arrays": lambda d: _truncate(os.path.join(d, "state", "**", "d", "*")),
    "deleted arrays": lambda d: [os.remove(p) for p in glob.glob(
        os.path.join(d, "state", "**", "d", "*"), recursive=True)],
    "truncated orbax metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "missing orbax metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "missing state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "unreadable config": lambda d: open(os.path.join(d, "config", "metadata"), "w").close(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_moved_aside_and_the_previous_one_restored(
        workdir, tiny, caplog, corruption):
    CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "2"))
    with caplog.at_level(logging.INFO):
        state = _restore(workdir, tiny)
    assert int(state["step"]) == 1 and float(state["w"][0, 0]) == 1.0
    assert "Checkpoint at step 2 cannot be loaded" in caplog.text
    assert _steps(workdir) == ["1"] and _corrupt_moved(workdir) == ["2"]


def test_when_every_checkpoint_is_corrupt_the_run_starts_over_saying_so(workdir, tiny,
                                                                        caplog):
    for step in ("1", "2"):
        CORRUPTIONS["truncated arrays"](os.path.join(workdir, "checkpoints", step))
    with caplog.at_level(logging.INFO):
        assert _restore(workdir, tiny) is None
    assert "were corrupt" in caplog.text and "starting from step 0" in caplog.text
    assert _corrupt_moved(workdir) == ["1", "2"]


def _fail_with(error):
    def fail(*args, **kwargs):
        raise error
    return fail


FAILURES = {  # (what fails, the error): none of them says the files are corrupt
    "I/O error": (ocp.StandardCheckpointHandler, OSError(errno.EIO, "Input/output error")),
    "permission denied": (ocp.StandardCheckpointHandler,
                          PermissionError(errno.EACCES, "denied")),
    "out of memory": (ocp.StandardCheckpointHandler,
                      RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4.0GiB")),
    "tensorstore permission": (ocp.StandardCheckpointHandler,
                               ValueError("PERMISSION_DENIED: Error reading local file")),
    "config unreadable": (checkpointing, PermissionError(errno.EACCES, "denied")),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failure_that_is_not_corruption_keeps_every_checkpoint(workdir, tiny, monkeypatch,
                                                              failure):
    owner, error = FAILURES[failure]
    name = "read_config" if owner is checkpointing else "restore"
    monkeypatch.setattr(owner, name, _fail_with(error))
    with pytest.raises(checkpointing.CheckpointRestoreError) as err:
        _restore(workdir, tiny)
    message = str(err.value)
    assert "step 2" in message and type(error).__name__ in message
    assert "left in place" in message and "rerun the same command" in message
    assert _steps(workdir) == ["1", "2"] and _corrupt_moved(workdir) == []


def test_a_step_folder_that_vanished_while_restoring_is_not_called_corrupt(workdir, tiny,
                                                                          monkeypatch):
    elsewhere = os.path.join(workdir, "elsewhere")

    def vanish(handler, directory, **kwargs):  # e.g. another job moved it, a remount
        shutil.move(os.path.dirname(str(directory)), elsewhere)  # the step folder
        raise FileNotFoundError(errno.ENOENT, "No such file", elsewhere)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", vanish)
    with pytest.raises(checkpointing.CheckpointRestoreError, match="FileNotFoundError"):
        _restore(workdir, tiny)
    assert _corrupt_moved(workdir) == [] and os.path.isdir(elsewhere)


def test_main_exits_with_the_message(workdir, tiny, monkeypatch, capsys):
    from dmz_jax import main
    monkeypatch.setattr(main, "FLAGS", types.SimpleNamespace(
        workdir=workdir, fresh=False, distributed=False, coordinator=None, num_processes=None,
        process_id=None, peer_timeout=60.0))
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore",
                        _fail_with(OSError(errno.EIO, "Input/output error")))
    assert main.train(tiny) == 2
    assert "ERROR: Could not restore the checkpoint at step 2" in capsys.readouterr().err
    assert _steps(workdir) == ["1", "2"]


# ---------------------------------------------------------------------------- resumable keys


def test_changed_learning_rate_and_clipping_resume_and_are_logged(workdir, tiny, caplog):
    tiny.training.learning_rate, tiny.training.grad_clip = 5e-4, 0.5
    tiny.training.num_steps = 10
    with caplog.at_level(logging.INFO):
        assert int(_restore(workdir, tiny)["step"]) == 2
    assert "Resuming with training.learning_rate 0.001 -> 0.0005" in caplog.text
    assert "Resuming with training.grad_clip 1.0 -> 0.5" in caplog.text
    assert "Resuming with training.num_steps 4 -> 10" in caplog.text


@pytest.mark.parametrize("key, value, says", [
    ("grad_clip", 0.0, "training.grad_clip: 1.0 -> 0.0 (gradient clipping turned off"),
    ("warmup_steps", 100, "training.warmup_steps: 0 -> 100 (the warm-up schedule turned on"),
    ("ema_decay", 0.99, "training.ema_decay: 0.999 -> 0.99"),
])
def test_changes_the_optimizer_state_cannot_take_are_refused(workdir, tiny, key, value, says):
    saved = tiny.to_dict()
    setattr(tiny.training, key, value)
    tiny.training.learning_rate = 5e-4  # resumable: never in the diff
    with pytest.raises(checkpointing.ConfigMismatchError) as err:
        _restore(workdir, tiny)
    assert says in str(err.value) and "learning_rate" not in str(err.value)
    diff = checkpointing.config_diff(saved, tiny)
    assert len(diff) == 1 and diff[0].strip().startswith(says)
    assert _steps(workdir) == ["1", "2"]


def test_remote_workdirs_stay_remote(tmp_path, monkeypatch):
    """A gs:// workdir keeps its scheme (os.path.abspath made it ./gs:/bucket/run before);
    a local one becomes absolute."""
    assert checkpointing.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert str(checkpointing.absolute("gs://bucket/run/prior")) == "gs://bucket/run/prior"
    monkeypatch.chdir(tmp_path)
    assert checkpointing.checkpoint_dir("run") == str(tmp_path / "run" / "checkpoints")


def test_a_key_the_code_retired_does_not_block_resume(tiny):
    """Checkpoints written before data.shuffle_buffer was retired resume; other unknown keys
    (a model option this code does not know) still count as a difference."""
    saved = tiny.to_dict()
    saved["data"]["shuffle_buffer"] = 10_000
    assert checkpointing.config_diff(saved, tiny) == []
    saved["model"]["mystery"] = 1
    assert checkpointing.config_diff(saved, tiny) == ["  model.mystery: 1 -> '<absent>'"]


# ---------------------------------------------------------------------------- processes


def _as_process(monkeypatch, index, replies, events, peer_codes=None):
    """Makes checkpointing see process `index` of 2; the collectives are recorded and the
    broadcasts answered from `replies` (what process 0 sent), or echoed when it is None;
    the allgather of restore outcomes pairs this process's code with the next of
    `peer_codes` (what the other process reports; default: the same as this one).
    The real thing, two processes and a shard only one of them reads:
    tests/test_multihost_restore.py."""
    sent, peer_codes = [], list(peer_codes or [])
    monkeypatch.setattr(checkpointing, "_process", lambda: (index, 2))

    def broadcast(tree, is_source=None):
        events.append("broadcast")
        sent.append(np.asarray(tree).copy())
        return replies.pop(0) if replies is not None else tree

    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(multihost_utils, "sync_global_devices",
                        lambda name: events.append("barrier"))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, tiled=False: np.stack(
        [x, np.int32(peer_codes.pop(0)) if peer_codes else x]))
    real_move = checkpointing._move
    monkeypatch.setattr(checkpointing, "_move",
                        lambda *a: (events.append("move"), real_move(*a)))
    return sent


def test_process_0_decides_and_moves_the_others_follow(workdir, tiny, tmp_path, monkeypatch):
    other = str(tmp_path / "process1")
    shutil.copytree(workdir, other)  # the same files, as another host sees them
    for path in (workdir, other):
        CORRUPTIONS["missing state item"](os.path.join(path, "checkpoints", "2"))
    events0 = []
    sent = _as_process(monkeypatch, 0, None, events0)
    assert int(_restore(workdir, tiny)["step"]) == 1
    assert events0.index("broadcast") < events0.index("barrier") < events0.index("move")
    assert _corrupt_moved(workdir) == ["2"]
    events1 = []
    _as_process(monkeypatch, 1, list(sent), events1)
    assert int(_restore(other, tiny)["step"]) == 1  # told by process 0
    assert "move" not in events1 and events1.count("barrier") == events0.count("barrier")
    assert _steps(other) == ["1", "2"] and _corrupt_moved(other) == []


def test_a_restore_that_failed_on_the_other_process_counts_here(workdir, tiny, monkeypatch):
    """Process 0 reads step 2 fine, process 1 reports its shard corrupt (outcome code 3):
    process 0 moves step 2 aside too and both take step 1; were the outcomes not exchanged,
    process 0 would train on from step 2 alone."""
    events = []
    _as_process(monkeypatch, 0, None, events, peer_codes=[checkpointing._CORRUPT])
    assert int(_restore(workdir, tiny)["step"]) == 1
    assert _corrupt_moved(workdir) == ["2"] and "move" in events



def test_replicated_arrays_are_saved_whole_from_one_cpu_device(tmp_path, tiny, monkeypatch):
    """orbax's replica-parallel saving slices a replicated array per device (an eager slice,
    compiled per leaf shape and device); on CPU devices checkpointing turns it off. The saved
    state restores equal."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put({"step": jnp.int32(3), "w": jnp.arange(64 * 48.0).reshape(64, 48),
                            "b": jnp.ones((40,))}, replicated)
    assert len(state["w"].sharding.device_set) == len(jax.devices()) > 1
    slices = []
    real_slice = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim",
                        lambda x, *a, **k: slices.append(x.shape) or real_slice(x, *a, **k))
    with checkpointing.create_manager(str(tmp_path), 1) as manager:
        checkpointing.save(manager, 3, state, tiny)
        manager.wait_until_finished()
    assert slices == []
    restored = saved_state(str(tmp_path), 3)
    for key in state:
        np.testing.assert_array_equal(restored[key], np.asarray(state[key]))
