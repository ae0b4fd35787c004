"""dmz_jax/warm_start.py picks the newest step that orbax committed, locally and on gs://.

An uncommitted step looks different on each filesystem: a local save in progress is a
`<step>.orbax-checkpoint-tmp-*` folder (renamed when done), a GCS one is a `<step>` folder
without commit_success.txt. Listing digit-named folders (as warm_start did) takes the second
for a finished checkpoint; orbax's step utilities do not. No JAX compile here.
"""

import numpy as np
import pytest
from etils import epath
from fake_gcs import fake_gcs

import jax
from dmz_jax import checkpointing, warm_start
from conftest import tiny_config

PARAMS = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                    "bias": np.zeros(3, np.float32)}}


def save_step(workdir: str, step: int, scale: float) -> None:
    """A committed step whose params and EMA params are PARAMS * scale."""
    params = jax.tree.map(lambda x: x * scale, PARAMS)
    manager = checkpointing.create_manager(workdir, keep=5)
    checkpointing.save(manager, step, {"params": params, "ema_params": params,
                                       "step": np.int32(step)}, tiny_config())
    manager.wait_until_finished()
    manager.close()


def test_skips_an_uncommitted_and_an_incomplete_newer_step(tmp_path):
    workdir = str(tmp_path / "run")
    save_step(workdir, 5, scale=1.0)
    folder = epath.Path(checkpointing.checkpoint_dir(workdir))
    (folder / "7.orbax-checkpoint-tmp-1700000000000000" / "state").mkdir(parents=True)
    (folder / "9" / "config").mkdir(parents=True)  # finished folder, but no state/ item
    assert warm_start.committed_steps(folder) == [5, 9]

    state_dir = warm_start.check(workdir, PARAMS)
    assert state_dir == folder / "5" / "state"
    placed = checkpointing.placed(jax.eval_shape(lambda: PARAMS),
                                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    params, ema = warm_start.load(state_dir, placed)
    np.testing.assert_array_equal(params["dense"]["kernel"], PARAMS["dense"]["kernel"])
    np.testing.assert_array_equal(ema["dense"]["kernel"], PARAMS["dense"]["kernel"])


def test_takes_the_newest_of_several_committed_steps(tmp_path):
    workdir = str(tmp_path / "run")
    save_step(workdir, 2, scale=1.0)
    save_step(workdir, 4, scale=3.0)
    state_dir = warm_start.newest_state_dir(workdir)
    assert state_dir.parent.name == "4"


def test_only_uncommitted_steps_is_no_checkpoint(tmp_path):
    folder = epath.Path(checkpointing.checkpoint_dir(str(tmp_path / "run")))
    (folder / "3.orbax-checkpoint-tmp-1700000000000000" / "state").mkdir(parents=True)
    with pytest.raises(warm_start.IncompatibleInitError, match="holds no checkpoint"):
        warm_start.newest_state_dir(str(tmp_path / "run"))


def gcs_step(folder: epath.Path, step: int, committed: bool) -> None:
    """A step folder as orbax leaves it on GCS: items, and commit_success.txt once done."""
    for item in checkpointing.ITEMS:
        (folder / str(step) / item).mkdir(parents=True)
        (folder / str(step) / item / "_METADATA").write_text("{}")
    if committed:
        (folder / str(step) / "commit_success.txt").write_text("Checkpoint commit was successful")


def test_gcs_step_without_commit_marker_is_skipped(tmp_path):
    with fake_gcs(tmp_path / "gcs"):
        folder = epath.Path(checkpointing.checkpoint_dir("gs://bucket/run"))
        assert str(folder) == "gs://bucket/run/checkpoints"
        gcs_step(folder, 5, committed=True)
        gcs_step(folder, 7, committed=False)  # still being written (or its writer died)
        assert warm_start.committed_steps(folder) == [5]
        assert str(warm_start.newest_state_dir("gs://bucket/run")) == (
            "gs://bucket/run/checkpoints/5/state")

        (folder / "5" / "commit_success.txt").unlink()
        with pytest.raises(warm_start.IncompatibleInitError, match="holds no checkpoint"):
            warm_start.newest_state_dir("gs://bucket/run")
    assert (tmp_path / "gcs" / "bucket" / "run" / "checkpoints" / "7" / "state").is_dir()
