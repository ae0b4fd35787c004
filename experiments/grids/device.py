"""The device grid: what one H100 can answer in 8 minutes, start to finish.

    python experiments/device_run.py --out=runs/device          # on the device
                                                                 # (docs/device_grid.md: carry + run)
    python experiments/device_run.py --out=/tmp/device --tiny   # tests: CPU, 40 s to 2 min

The same base, protocol and arms as experiments/grids/cpu.py (configs/fashion_mnist.py,
|z| = 16, classifier features), at a budget sized for the device: 1,000 steps of batch 128
(128,000 images per run, 6.7x the CPU grid's 600 x 32), FD of 1,024 samples per K (CPU: 256),
paired seeds (a seed gives every arm the same data order, the same initialisation of shared
modules, the same x_T noise and, for binary z, the same Bernoulli draws), the FD at K = 10
along training for dmz and no_z (claim 5's FD half; no NLL: its T = 1000-call VLB does not
fit). No learned bit prior either (claim 4's third part is "not run").

Runs go tier by tier (`order`), each tier seed by seed, so that a budget cut leaves whole
paired comparisons: (dmz, no_z) for claim 1 (and DDIM for claim 6) first, then Gaussian z
(claim 2), z in the time embedding (claim 3), the |z| sweep (claim 4), the authors' recipe.
experiments/device_run.py starts an arm only when its seeds are predicted to fit the budget
(`estimate` below until it has measured a run, then its measurements).

## The device-time estimate (no GPU figure of this code exists yet; every number below is an
## assumption or is derived from the 2-core CPU measurements in docs/benchmarks.md)

FLOPs (XLA's cost analysis, docs/benchmarks.md, Fashion-MNIST config at |z| = 64):
  full train step 513 MFLOP/image -> at |z| = 16 (16 instead of 64 cross-attention tokens)
  about 0.5 GFLOP/image: 64 GFLOP per step of batch 128; U-Net forward 139 MFLOP/image:
  71 GFLOP per sampling call of batch 512.
Achieved rate, assumed: 3 TFLOP/s, i.e. 5% of the H100's ~67 TFLOP/s plain fp32 (~0.6% of
  its ~495 TFLOP/s dense TF32, ~0.3% of ~990 dense bf16; the KINDS.md matmul reached 798
  bf16 on 8192^3): a 16-channel U-Net cannot fill tensor-core tiles and is launch-bound (the
  2-core CPU reached 44 GFLOP/s on it). So 64 / 3000 s = 21 ms per train step, 71 / 3000 s =
  24 ms per sampling call.
Per run: training 1,000 x 21 ms = 21 s; FD at K = 10, 20, 100: 1,024 samples = 2 batches x
  130 calls x 24 ms = 6.2 s (DDIM arms twice that); encodes, probes (sklearn, CPU), FD
  algebra about 4 s  ->  ~31 s (dmz with DDIM and its curve ~39 s).
Compiles, per arm (its first seed only; later seeds reuse them): the train step ~20 s (the
  2-core CPU took 30 s for it, docs/benchmarks.md; assumed 2/3 of that on the device's 16
  cores with autotuning), 3 sampler loops x 6 s, encoder 2 s  ->  ~40 s (DDIM arms ~58 s).
Fixed: Python + jax + CUDA start 15 s, benchmarks <= 60 s (their float32 train step is the
  dmz arm's, compiled once), data + classifier features ~6 s.
Cumulative, from the start: 81 s before the first run; dmz s0 +77 s (158), no_z s0 +71
  (229), dmz s1 +39 (268), no_z s1 +31 (299), gaussian s0 +71 (370), gaussian s1 +31 (401)
  [+2 s per run to re-render the report]; the next tier (time_embedding: 71 + 31) would end
  near 515 s, past the 450 s budget. So the estimate is: tiers 1-2 (6 runs, claims 1, 2, 5's
  FD half, 6) fit; the rest run only if the device is faster than assumed. Total with the
  report: ~415-460 s of the 480 s allowed.
"""

import os

from configs import fashion_mnist
from configs.authors import fashion_mnist as authors_fashion_mnist
from experiments.grids import cpu

COMMON = {  # the budget, shared by every run
    "model.latent_dim": 16,
    "training.batch_size": 128,
    "training.num_steps": 1000,
    "training.checkpoint_every": 250,  # the points of the FD curve (no checkpoint is written)
    "sampling.batch_size": 512,  # 1,024 FD samples = 2 compiled batches
    "sampling.steps": (10, 100),
}
PROTOCOL = {
    "fd_steps": (10, 20, 100),  # K, respaced ancestral sampling (and DDIM)
    "fd_num_samples": 1024,  # generated images per FD, against the first 1,024 train images
    "fd_features": "classifier",
    "classifier_steps": 2000,
    "nll_examples": 0,  # no NLL on the device grid
    "prior_steps": 0,  # no learned prior: prior_variants only name the |z| sweep
    "curve_steps": 10,  # K of the FD along training (at every training.checkpoint_every)
    "ddim_variants": ("dmz", "authors"),
    "prior_variants": ("dmz", "z64", "z256"),
    "curve_variants": ("dmz", "no_z"),
}
ORDER = (("dmz", "no_z"), ("gaussian",), ("time_embedding",), ("z64", "z256"), ("authors",))
ESTIMATE = {  # seconds, see the docstring: the planner's figures until it measures a run
    "first_run_s": 71.0,  # an arm's first seed: compiles ~40 + run ~31
    "next_run_s": 31.0,  # a later seed of the same arm
    "ddim_extra_first_s": 6.0 + 18.0,  # DDIM at 3 K: run + compiles
    "ddim_extra_next_s": 6.0,
}


def _flat(config, prefix: str = "") -> dict:
    """A ConfigDict as {"a.b": value}, tuples kept (update_from_flattened_dict's input)."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def authors_overrides() -> dict:
    """configs/authors/fashion_mnist.py as overrides of configs/fashion_mnist.py: every
    model, diffusion, data and training key the two differ in, except the shared budget
    (COMMON) and the protocol (eval.*, sampling.*, modes.*). So the authors' recipe
    (diffusers-layout U-Net, Conv-BN encoder, Gumbel-softmax bits as one token, input
    perturbation 0.15, the loss-second-moment timestep sampler, no gradient clipping) runs
    at the same |z|, steps and batch as ours."""
    ours, theirs = _flat(fashion_mnist.get_config()), _flat(authors_fashion_mnist.get_config())
    skip = ("eval.", "sampling.", "modes.")
    return {k: v for k, v in theirs.items()
            if v != ours.get(k) and k not in COMMON and not k.startswith(skip)}


def get_grid(variant: str = ""):
    """The device grid; variant "tiny": 2 arms, 1 seed, 4 steps of the tiny config (tests)."""
    if variant == "tiny":
        return _tiny()
    if variant:
        raise ValueError(f"unknown variant {variant!r} of {os.path.basename(__file__)}")
    return {
        "name": "device",
        "note": ("one H100 for at most 8 minutes (experiments/device_run.py); runs tier by "
                 "tier in the order dmz+no_z, gaussian, time_embedding, z64+z256, authors, "
                 "each tier seed by seed, stopping before the budget; no NLL and no learned "
                 "prior on this budget"),
        "base": "configs/fashion_mnist.py",
        "common": dict(COMMON),
        "seeds": (0, 1),
        # the CPU grid's arms (the same overrides, so the two reports compare), plus ours
        "variants": {**cpu.get_grid()["variants"], "authors": authors_overrides()},
        "protocol": dict(PROTOCOL),
        "order": ORDER,
        "estimate": dict(ESTIMATE),
    }


def _tiny():
    """Seconds on 2 CPU cores, for tests; its numbers mean nothing."""
    return {
        "name": "device_tiny",
        "base": "configs/fashion_mnist.py:tiny",
        "common": {"training.num_steps": 4, "training.checkpoint_every": 2,
                   "sampling.batch_size": 8, "eval.encode_batch_size": 40},
        "seeds": (0,),
        "variants": {"dmz": {}, "no_z": {"model.latent_type": "none"}},
        "protocol": {"fd_steps": (2, 5), "fd_num_samples": 16, "fd_features": "classifier",
                     "classifier_steps": 10, "nll_examples": 0, "prior_steps": 0,
                     "curve_steps": 2, "ddim_variants": ("dmz",), "prior_variants": ("dmz",),
                     "curve_variants": ("dmz", "no_z")},
        "order": (("dmz", "no_z"),),
        "estimate": {"first_run_s": 0.0, "next_run_s": 0.0, "ddim_extra_first_s": 0.0,
                     "ddim_extra_next_s": 0.0},
    }
