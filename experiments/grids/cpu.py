"""The CPU budget: Fashion-MNIST (the bundled 10k-image subset when nothing else is there),
a small U-Net, 600 steps per run, 2 seeds; about two hours on 2 CPU cores.

    python experiments/ablations.py --grid=experiments/grids/cpu.py \
        --root=runs/ablations_cpu --results=docs/results.md

Base: configs/fashion_mnist.py (its short-budget choices: threshold bits, centred encoder
logits, encoder learning rate x 0.1, lr 1e-3) with |z| = 16 bits, the paper's CIFAR-10 size.
"""


def get_grid():
    return {
        "name": "cpu",
        "note": ("the grid was run by several invocations of this command (stopped and "
                 "rerun; finished runs were skipped), at times two copies side by side (one "
                 "lock per run), sharing the 2 cores also with test runs: wall times are "
                 "upper bounds. The learned-prior samples of z256 and of z64 seed 1 were "
                 "drawn with the key/value-cached sampler, the earlier ones by recomputing "
                 "the prefix: the same bits from the same noise (tests/test_prior.py)"),
        "base": "configs/fashion_mnist.py",
        "common": {  # the budget, shared by every run
            "model.latent_dim": 16,
            "training.num_steps": 600,
            "training.checkpoint_every": 200,  # the training curves' points
            "training.keep_checkpoints": 3,
            "sampling.batch_size": 128,
            "sampling.steps": (10, 100),  # the sample grids of the report
        },
        "seeds": (0, 1),
        "variants": {
            "dmz": {},  # binary z, 16 bits, cross-attention
            "no_z": {"model.latent_type": "none"},  # the same U-Net, no encoder
            "gaussian": {"model.latent_type": "gaussian"},  # z ~ N(0, I) at sampling
            "time_embedding": {"model.conditioning": "time_embedding"},
            "z64": {"model.latent_dim": 64},
            "z256": {"model.latent_dim": 256},
        },
        "protocol": {
            "fd_steps": (10, 20, 50, 100),  # K, respaced ancestral sampling (and DDIM)
            "fd_num_samples": 256,  # generated images per FD, against 256 training images
            "fd_features": "classifier",  # no Inception weights offline
            "classifier_steps": 2000,
            "nll_examples": 16,  # test images of the full VLB (T = 1000 network calls each)
            "prior_steps": 300,  # the learned bit prior's optimizer steps
            "curve_steps": 10,  # K of the FD along training
            "ddim_variants": ("dmz",),
            "prior_variants": ("dmz", "z64", "z256"),
            "curve_variants": ("dmz", "no_z"),
        },
    }
