"""A grid that runs in about a minute on 2 CPU cores, for the tests: two variants, one
seed, 4 training steps of configs/fashion_mnist.py:tiny. Its numbers mean nothing."""


def get_grid():
    return {
        "name": "tiny",
        "base": "configs/fashion_mnist.py:tiny",
        "common": {"training.num_steps": 4, "training.checkpoint_every": 2,
                   "sampling.batch_size": 8},
        "seeds": (0,),
        "variants": {"dmz": {}, "no_z": {"model.latent_type": "none"}},
        "protocol": {
            "fd_steps": (2, 5), "fd_num_samples": 16, "fd_features": "classifier",
            "classifier_steps": 10, "nll_examples": 8, "prior_steps": 5, "curve_steps": 2,
            "ddim_variants": ("dmz",), "prior_variants": ("dmz",),
            "curve_variants": ("dmz", "no_z"),
        },
    }
