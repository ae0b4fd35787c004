"""The CPU grid sized for power: claims 1 (DMZ vs no z) and 2 (Bernoulli vs Gaussian z) first,
paired seeds, FD of 1,024 samples; docs/results.md gives the pilot and the power analysis that
chose its seeds.

    nice -n 10 python experiments/ablations.py --grid=experiments/grids/power.py \
        --root=runs/power --results=docs/results.md

Every finished run's evaluation is stored in docs/results/runs/ (kept in git): a new machine
continues the grid where it stopped and `--report_only` re-renders the report without training.

Base: configs/fashion_mnist.py on the bundled 10k-image subset (pinned, so that every machine
trains on the same images), |z| = 16 bits, 600 steps of batch 32 (the budget of the earlier
`cpu` grid: its seed spread is the pilot's prior). Pairing: a seed gives every arm the same
data order, the same initialisation of the modules the arms share, the same x_T noise and the
same z draws (the Gaussian arm's from the same keys); the report compares arms within a seed.

Arms, in tiers (a stopped grid holds whole paired comparisons): dmz, no_z, gaussian, z in the
time embedding and |z| = 64 (claims 1-4), seed by seed; then the authors' recipe at the same
budget (claim 6 for both recipes, the InfoDiffusion probe). Claim 4 is a two-point sweep
(16, 64 bits) without the learned prior; claim 5 has no curve: its FD half is read at the end
of training (claim 1's FD), its NLL half (a T = 1000 VLB per checkpoint) does not fit.
"""

from experiments.grids import cpu, device

SEEDS = (0, 1, 2, 3, 4, 5)  # the pilot was (0, 1); docs/results.md derives the rest


def get_grid():
    arms = cpu.get_grid()["variants"]
    return {
        "name": "power",
        "note": ("runs at nice 10 beside other work on the same 2 cores (tests, editing): "
                 "wall times are upper bounds"),
        "base": "configs/fashion_mnist.py",
        "common": {
            "data.source": "bundled",
            "model.latent_dim": 16,
            "training.num_steps": 600,
            "training.checkpoint_every": 300,
            "training.keep_checkpoints": 1,
            "sampling.batch_size": 128,
            "sampling.steps": (10,),
        },
        "seeds": SEEDS,
        "variants": {name: arms[name]
                     for name in ("dmz", "no_z", "gaussian", "time_embedding", "z64")}
        | {"authors": device.authors_overrides()},
        "power": {  # experiments/report.py: power_section
            "pilot_seeds": (0, 1),
            "note": ("When the tests were chosen: the paired t-test and the range rule were "
                     "fixed before the pilot; the one-sided test against the paper's effect "
                     "(claims 1 and 2) was added at 27 of 36 runs, when seed 4 had turned both "
                     "claims' paired t-tests from p < 0.05 to within spread. The report was "
                     "read after 2, 3, 4 and 5 seeds as well as at the planned 6."),
            # claim: (arm A, arm B, the paper's gap as a share of B's FD, where it comes from)
            "effects": {
                1: ("dmz", "no_z", 1 - 12.92 / 16.38,
                    "21% (no DMZ figure: Diff-AE vs DDIM at T=10, CelebA-64, 12.92 vs 16.38)"),
                2: ("dmz", "gaussian", 1 - 4.79 / 34.32,
                    "86% (CIFAR-10, |z|=16, T=100: 4.79 vs 34.32)"),
            },
        },
        "appendix": {
            "The device grid (not run: no session has had a GPU)": (
                "`experiments/grids/device.py`, run by `experiments/device_run.py` on one H100 "
                "(docs/device_grid.md: the command, with the wheels to carry), measures the "
                "GPU rows of docs/benchmarks.md (train step, U-Net forward and K=10 sampling, "
                "float32 and bfloat16, images/s per chip) in its first minute, then these "
                "arms plus the |z| sweep at 1,000 steps of batch 128 with FD of 1,024 samples "
                "at K = 10, 20, 100, paired seeds 0 and 1, writing docs/results_gpu.md as it "
                "goes. Estimated device time: 415-460 s of the 480 s allowed (no GPU figure "
                "of this code exists: FLOPs from XLA's counts, an assumed 3 TFLOP/s achieved; "
                "the arithmetic is in the grid file's docstring). tests/test_device_grid.py "
                "runs its tiny variant end to end on the CPU, a SIGTERM and a rerun included."),
        },
        # seed by seed over the claims 1-4 arms (the time embedding and |z| = 64 catch up on
        # seeds 0-3 before seed 4 of any arm), then the authors' recipe
        "order": (("dmz", "no_z", "gaussian", "time_embedding", "z64"), ("authors",)),
        "protocol": {
            "fd_steps": (10, 20),  # K: the few-step regime of claims 1 and 2
            "fd_num_samples": 1024,  # per FD, against the first 1,024 training images
            "fd_repeats": 2,  # FD at K=10 from a second noise seed: the sample spread
            "fd_features": "classifier",
            "classifier_steps": 2000,
            "nll_examples": 0,
            "prior_steps": 0,
            "curve_steps": 10,
            "ddim_variants": ("dmz", "authors"),
            "prior_variants": (),
            "curve_variants": (),
            "sweep_variants": ("dmz", "z64"),  # claim 4: |z| = 16, 64
            "infodiffusion_probe": "train",  # their protocol: the training split's codes
        },
    }
