"""The mesh and the fsdp placement of the train state (8 fake CPU devices).

That data, fsdp and mixed meshes train like 1 device is in test_train.py; resuming an fsdp
run on another mesh is below.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from dmz_jax import sharding, train
from dmz_jax import train_state as ts
from dmz_jax.model import create_model


@pytest.mark.parametrize("shape,fsdp,spec", [
    ((3, 3, 16, 32), 8, P(None, None, None, "fsdp")),  # the largest divisible dimension
    ((32, 16), 8, P("fsdp", None)),
    ((16, 16), 4, P(None, "fsdp")),  # equal sizes: the last
    ((3, 3, 12, 6), 4, P(None, None, "fsdp", None)),  # 6 is not divisible by 4
    ((7,), 8, P()),  # nothing divisible: replicated
    ((), 8, P()),  # scalars (step, counters)
    ((3, 3, 16, 32), 1, P()),  # no fsdp axis: replicated, as before
])
def test_fsdp_spec(shape, fsdp, spec):
    assert sharding.fsdp_spec(shape, fsdp) == spec


def _abstract_state(config):
    model, tx = create_model(config), ts.make_optimizer(config.training)
    return jax.eval_shape(lambda: ts.create_train_state(config, model, tx))


def test_fsdp_keeps_about_one_eighth_of_the_state_per_device():
    abstract = _abstract_state(tiny_config())
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    for data_axis, fsdp, most in ((8, 1, 1.0), (1, 8, 0.13), (2, 4, 0.26)):
        shardings = sharding.state_shardings(abstract, sharding.create_mesh(data_axis, fsdp))
        per_device = sum(
            int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
        assert per_device <= most * total, (data_axis, fsdp, per_device / total)
        if fsdp == 1:
            assert per_device == total


@pytest.mark.slow  # a 2-step run on an fsdp mesh, resumed on a data mesh
def test_fsdp_checkpoint_resumes_on_another_mesh(tmp_path):
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.training.num_steps, config.eval.at_end = 2, False
    train.train_and_evaluate(config, str(tmp_path))
    run = train.Run(config, str(tmp_path))
    state = run.initial_state()
    kernel = state.params["denoiser"]["out_conv"]["kernel"]  # [3, 3, 16, C]: split on 16
    assert kernel.sharding.spec == sharding.fsdp_spec(kernel.shape, 8)
    assert kernel.addressable_shards[0].data.shape[2] == kernel.shape[2] // 8
    saved = jax.device_get(state)
    run.close()
    config.mesh.data, config.mesh.fsdp = 8, 1  # the same checkpoint, replicated
    run = train.Run(config, str(tmp_path))
    again = run.initial_state()
    run.close()
    assert int(again.step) == 2
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(again))):
        np.testing.assert_array_equal(a, b)
