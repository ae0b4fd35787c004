"""One of the two processes of tests/test_multihost_restore.py (not a test module).

python tests/multihost_restore_worker.py save|restore PORT PROCESS_ID WORKDIR
save: saves steps 1 and 2 of a state split over the two processes (mesh.fsdp = 2: each
holds half of every array), then process 1 truncates the data files it wrote for step 2
(so only process 1 reads a bad chunk). restore (a new pair of processes, as after a
restart: nothing cached) restores and prints "RESULT step=<the step restored> w=<a value
of this process's half>" or "RESULT error=<exception type>".
"""

import glob
import os
import sys

import jax

mode, port, process_id, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                           heartbeat_timeout_seconds=30)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import fashion_mnist  # noqa: E402
from dmz_jax import checkpointing, sharding  # noqa: E402

config = fashion_mnist.get_config("tiny")
mesh = sharding.create_mesh(data=1, fsdp=2)


def state(step):  # w: step + noise in [0, 0.5), 256 KB (not inlined in OCDBT's index)
    noise = jax.random.uniform(jax.random.PRNGKey(0), (512, 128), maxval=0.5)
    return {"step": jnp.int32(step), "w": step + noise}


abstract = jax.eval_shape(lambda: state(0))
shardings = sharding.state_shardings(abstract, mesh)
target = checkpointing.placed(abstract, shardings)
manager = checkpointing.create_manager(workdir, 5)
if mode == "save":
    for step in (1, 2):
        checkpointing.save(manager, step, jax.jit(lambda s=step: state(s),
                                                  out_shardings=shardings)(), config)
    manager.wait_until_finished()
    multihost_utils.sync_global_devices("saved")
    if process_id == 1:
        step_dir = os.path.join(workdir, "checkpoints", "2", "state")
        mine = [p for p in glob.glob(os.path.join(step_dir, "ocdbt.process_1", "d", "*"))
                if os.path.isfile(p)]
        assert mine, os.listdir(step_dir)
        for path in mine:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    multihost_utils.sync_global_devices("truncated")
else:
    try:
        restored = checkpointing.restore_latest(manager, target, config)
        value = float(np.asarray(restored["w"].addressable_shards[0].data)[0, 0]) // 1
        print(f"RESULT step={int(restored['step'])} w={value}", flush=True)
    except Exception as e:  # noqa: BLE001 - the test compares what each process ended with
        print(f"RESULT error={type(e).__name__}", flush=True)
manager.close()
