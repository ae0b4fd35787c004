"""The GPU budget: the CPU grid with ten times the steps and samples, for a session that has
a GPU (about 2 hours on one H100-class GPU, not measured yet). Not run so far: docs/results.md
reports only budgets that were run.

    python experiments/ablations.py --grid=experiments/grids/gpu.py \
        --root=runs/ablations_gpu --results=docs/results_gpu.md
"""

import importlib.util
import os


def get_grid():
    spec = importlib.util.spec_from_file_location(
        "cpu_grid", os.path.join(os.path.dirname(__file__), "cpu.py"))
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)
    grid = cpu.get_grid()
    grid["name"] = "gpu"
    grid["common"].update({"training.num_steps": 6000, "training.checkpoint_every": 2000,
                           "sampling.batch_size": 512})
    grid["variants"]["z8"] = {"model.latent_dim": 8}
    grid["protocol"].update({"fd_num_samples": 5000, "nll_examples": 256,
                             "prior_steps": 2000,
                             "prior_variants": ("z8", "dmz", "z64", "z256")})
    return grid
