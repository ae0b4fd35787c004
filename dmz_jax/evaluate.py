"""Evaluation of a DMZ train state: sample grids and the linear probe on the codes.

Used by the end-of-training summary; every function takes what it needs explicitly, so
notebooks and other modes can call them on any parameters.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import jax
import numpy as np

from dmz_jax import data, diffusion, images, probe, samplers, sharding
from dmz_jax.model import DMZ, image_shape
from dmz_jax.networks import latent as latent_lib


def make_sample_fn(config, model: DMZ, diff: diffusion.Diffusion, num_steps: int) -> Callable:
    """jit(params, rng) -> [sampling.num_samples, H, W, C] in [-1, 1], z from the prior."""
    n = config.sampling.num_samples
    shape = (n, *image_shape(config))

    def sample(params, rng):
        z_rng, x_rng = jax.random.split(rng)
        z = None
        if model.uses_latent:
            z = latent_lib.get_latent_type(model.latent_type).prior(z_rng, n, model.latent_dim)

        def model_fn(x_t, model_t):
            return model.apply({"params": params}, x_t, model_t, z, method=DMZ.denoise)

        return samplers.sample(diff, model_fn, shape, x_rng, method=config.sampling.method,
                               num_steps=num_steps, learn_sigma=config.model.learn_sigma,
                               eta=config.sampling.eta,
                               clip_denoised=config.sampling.clip_denoised)

    return jax.jit(sample)


def make_encode_fn(model: DMZ, mesh) -> Callable:
    """jit(params, images [B, H, W, C]) -> deterministic codes [B, latent_dim]."""

    def encode(params, x):
        return model.apply({"params": params}, x, method=DMZ.encode)

    return jax.jit(encode, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def encode_dataset(encode_fn, params, x: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Encodes [N, H, W, C] in fixed-size batches (the last one padded) -> [N, latent_dim]."""
    codes = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        padding = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
        batch = np.concatenate([chunk, padding])
        out = encode_fn(params, jax.device_put(batch, sharding.batch_sharding(mesh)))
        codes.append(np.asarray(out)[:len(chunk)])
    return np.concatenate(codes)


def evaluate_probe(config, model: DMZ, params, mesh, baseline_params=None) -> dict:
    """Linear-probe accuracy of the deterministic codes of `params` (train -> test split).

    With `baseline_params` (e.g. the untrained encoder), also `probe_accuracy_at_init`,
    from the same loaded splits and the same compiled encoder.
    """
    encode_fn = make_encode_fn(model, mesh)
    batch = config.eval.encode_batch_size
    train = data.load_split(config.data, "train", config.eval.probe_train_examples)
    test = data.load_split(config.data, "test", config.eval.probe_test_examples)

    def codes_and_accuracy(p):
        train_codes = encode_dataset(encode_fn, p, train["image"], batch, mesh)
        test_codes = encode_dataset(encode_fn, p, test["image"], batch, mesh)
        return train_codes, probe.linear_probe_accuracy(train_codes, train["label"],
                                                        test_codes, test["label"])

    train_codes, accuracy = codes_and_accuracy(params)
    result = {"probe_accuracy": accuracy,
              "bit_means": train_codes.mean(0).round(4).tolist(),
              "distinct_codes_train": int(len(np.unique(train_codes, axis=0)))}
    if baseline_params is not None:
        result["probe_accuracy_at_init"] = codes_and_accuracy(baseline_params)[1]
    return result


def write_sample_grids(config, model: DMZ, diff, params, step: int, workdir: str,
                       writer=None) -> list[str]:
    """Samples with each of config.sampling.steps; writes PNGs (and TensorBoard images)."""
    folder = os.path.join(workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in map(int, config.sampling.steps):
        x = make_sample_fn(config, model, diff, k)(params, jax.random.PRNGKey(config.seed + 1))
        grid = images.make_grid(images.to_uint8(np.asarray(x)))
        path = os.path.join(folder, f"step{step:08d}_K{k}.png")
        if jax.process_index() == 0:
            images.save_png(path, grid)
        if writer is not None:
            writer.write_images(step, {f"samples/K{k}": grid[None]})
        paths.append(path)
        logging.info("Wrote %s", path)
    return paths


def evaluate(config, model: DMZ, diff, params, step: int, workdir: str, mesh, writer=None,
             baseline_params: Optional[dict] = None) -> dict:
    """Sample grids and, when the data has classes, the linear probe (with its baseline)."""
    summary = {"step": step, "samples": write_sample_grids(config, model, diff, params, step,
                                                           workdir, writer)}
    summary["probe_accuracy"] = None  # no latent, or no class labels (celeb_a: attributes)
    if model.uses_latent and data.dataset_info(config.data).num_classes > 1:
        summary.update(evaluate_probe(config, model, params, mesh, baseline_params))
        if writer is not None:
            writer.write_scalars(step, {"probe_accuracy": summary["probe_accuracy"]})
    return summary
