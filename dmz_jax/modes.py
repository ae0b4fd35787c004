"""The modes that use a trained DMZ: thin wrappers over dmz_jax.api that write WORKDIR/MODE/.

    python -m dmz_jax.main --config=configs/fashion_mnist.py --workdir=W --mode=sample

Each mode loads W's newest checkpoint (or --checkpoint=STEP), EMA parameters, and writes into
a new folder: W/MODE, or W/MODE.1, W/MODE.2, ... when that exists (nothing is overwritten).
Its options are config keys (sampling.*, modes.*, eval.*), and the folder gets config.json.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np
from etils import epath

from dmz_jax import api, data, images
from dmz_jax.data import specs


class ModeError(ValueError):
    """A mode cannot run on this workdir or data; the message says what to do."""


def output_dir(workdir: str, mode: str) -> str:
    """W/MODE, or the first W/MODE.i that does not exist yet (created, empty)."""
    path, i = epath.Path(workdir) / mode, 0
    while path.exists():
        i += 1
        path = epath.Path(workdir) / f"{mode}.{i}"
    path.mkdir(parents=True)
    return str(path)


def _start(config, workdir: str, checkpoint: Optional[int], mode: str):
    model = api.load(workdir, checkpoint=checkpoint, config=config)
    out = output_dir(workdir, mode)
    (epath.Path(out) / "config.json").write_text(json.dumps(
        {"checkpoint_step": model.step, "config": config.to_dict()}, indent=2, default=str))
    return model, out


def _write_npz(path: str, **arrays) -> None:
    with epath.Path(path).open("wb") as f:  # local or gs://
        np.savez_compressed(f, **arrays)


def _write_json(path: str, values: dict) -> None:
    epath.Path(path).write_text(json.dumps(values, indent=2))
    logging.info("Wrote %s", path)


def _grid(path: str, rows: list[np.ndarray]) -> None:
    """PNG of rows of images [n, H, W, C] in [-1, 1], one row each."""
    stacked = np.concatenate([images.to_uint8(r) for r in rows])
    images.save_png(path, images.make_grid(stacked, columns=len(rows[0])))
    logging.info("Wrote %s", path)


def _split(config, n: Optional[int] = None) -> dict:
    split = data.load_split(config.data, config.modes.split, n)
    if not len(split["image"]):
        raise ModeError(f"split {config.modes.split!r} of {config.data.name} is empty")
    return split


# --- modes


def sample(config, workdir, checkpoint=None) -> str:
    """sampling.num_samples images per K in sampling.steps, z from sampling.prior."""
    s = config.sampling
    if s.prior not in api.PRIORS:
        raise ModeError(f"sampling.prior={s.prior!r}: use one of {api.PRIORS}")
    model, out = _start(config, workdir, checkpoint, "sample")
    for k in map(int, s.steps):
        x = model.sample(s.num_samples, steps=k, prior=s.prior, seed=s.seed)
        name = f"{s.prior}_{s.method}_K{k}"
        _write_npz(os.path.join(out, f"{name}.npz"), images=images.to_uint8(x))
        images.save_png(os.path.join(out, f"{name}.png"), images.make_grid(images.to_uint8(x)))
        logging.info("Wrote %s/%s.{png,npz}", out, name)
    return out


def encode(config, workdir, checkpoint=None) -> str:
    """Codes of modes.split: codes.npz with bits, probabilities, labels (and attributes)."""
    model, out = _start(config, workdir, checkpoint, "encode")
    split = _split(config)
    arrays = {"bits": model.encode(split["image"]).astype(np.uint8),
              "probabilities": model.encode_probabilities(split["image"]),
              "labels": split["label"]}
    if "attributes" in split:
        arrays["attributes"] = split["attributes"]
    _write_npz(os.path.join(out, "codes.npz"), **arrays)
    logging.info("Wrote %s/codes.npz (%d codes of %d bits)", out, *arrays["bits"].shape)
    return out


def reconstruction_metrics(x: np.ndarray, y: np.ndarray) -> dict:
    """MSE, PSNR (dB) and SSIM of y against x, images in [-1, 1], means over images."""
    from dmz_jax.metrics import image_quality as iq
    return {"mse": float(np.mean(iq.mse(x, y))), "psnr": float(np.mean(iq.psnr(x, y))),
            "ssim": float(np.mean(iq.ssim(x, y)))}


def reconstruct(config, workdir, checkpoint=None) -> str:
    """modes.num_images of modes.split from z alone and from z + inverted x_T (K=modes.steps)."""
    model, out = _start(config, workdir, checkpoint, "reconstruct")
    x = _split(config, config.modes.num_images)["image"]
    k = config.modes.steps
    z_only = model.reconstruct(x, steps=k, inverted=False, seed=config.sampling.seed)
    inverted = model.reconstruct(x, steps=k, inverted=True)
    _grid(os.path.join(out, f"input_zonly_inverted_K{k}.png"), [x, z_only, inverted])
    metrics = {f"z_only_{key}": v for key, v in reconstruction_metrics(x, z_only).items()}
    metrics.update({f"inverted_{key}": v for key, v in reconstruction_metrics(x, inverted).items()})
    _write_json(os.path.join(out, "metrics.json"),
                {**metrics, "steps": k, "num_images": len(x), "step": model.step})
    return out


def interpolate(config, workdir, checkpoint=None) -> str:
    """Pairs of consecutive images of modes.split: one PNG row per pair, a -> b."""
    o = config.modes
    model, out = _start(config, workdir, checkpoint, "interpolate")
    x = _split(config, 2 * max(1, o.num_images // 2))["image"]
    frames = model.interpolate(x[0::2], x[1::2], o.frames, steps=o.steps, path=o.path,
                               x_T=o.x_T)
    _grid(os.path.join(out, f"{o.path}_{o.x_T}_K{o.steps}.png"), list(frames))
    return out


def label_names(config) -> tuple[str, ...]:
    """Names a label can take on this dataset: classes, or CelebA's attributes."""
    if config.data.name in ("fashion_mnist", "fashion_mnist_edges"):  # the same examples
        return specs.FASHION_MNIST_CLASSES
    if config.data.name == "celeb_a":
        return specs.CELEBA_ATTRIBUTES
    if config.data.name == "cifar10":
        return ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck")
    raise ModeError(f"{config.data.name} has no named labels; manipulate needs a dataset "
                    "with classes or attributes")


def _targets(config, split: dict, label: str) -> np.ndarray:
    """0/1 targets [N] of `label` for the examples of `split`."""
    index = label_names(config).index(label)
    if config.data.name == "celeb_a":
        return split["attributes"][:, index]
    return (split["label"] == index).astype(np.int32)


def manipulate(config, workdir, checkpoint=None) -> str:
    """Edits modes.num_images images of modes.split, decoded with their own inverted x_T:
    with modes.bits, one row per listed bit, flipped; else rows moving the codes along a
    logistic-regression direction for modes.label (scales modes.scales, bits kept in [0, 1])."""
    o = config.modes
    if o.bits:
        bad = [b for b in o.bits if not 0 <= b < config.model.latent_dim]
        if bad:
            raise ModeError(f"modes.bits={tuple(o.bits)}: {bad} not in "
                            f"0..{config.model.latent_dim - 1}")
    elif o.label not in label_names(config):
        raise ModeError(f"modes.label={o.label!r} is not a label of {config.data.name}; "
                        f"use one of {list(label_names(config))}")
    model, out = _start(config, workdir, checkpoint, "manipulate")
    x = _split(config, o.num_images)["image"]
    z, x_T = model.invert(x, steps=o.steps)
    if o.bits:
        codes = [np.where(np.arange(z.shape[1]) == b, 1.0 - z, z) for b in o.bits]
        name, info = "bits", {"bits": list(o.bits)}
    else:
        w = _label_direction(config, model, o.label)
        codes = [np.clip(z + s * w, 0.0, 1.0) for s in o.scales]
        name = o.label.replace("/", "_")
        info = {"label": o.label, "scales": list(o.scales), "weights": w.round(4).tolist()}
    rows = [model.decode(c, x_T, steps=o.steps, method="ddim", eta=0.0) for c in codes]
    _grid(os.path.join(out, f"{name}_K{o.steps}.png"), [x] + rows)
    _write_json(os.path.join(out, "edit.json"), info)
    return out


def _label_direction(config, model, label: str) -> np.ndarray:
    """A logistic regression's weights [|z|] for `label` on the training codes, scaled so
    that the strongest bit moves by 1 per unit of scale."""
    from sklearn.linear_model import LogisticRegression
    train = data.load_split(config.data, "train", config.eval.probe_train_examples)
    fit = LogisticRegression(max_iter=2000).fit(model.encode(train["image"]),
                                                _targets(config, train, label))
    return fit.coef_[0] / np.abs(fit.coef_[0]).max()


def train_prior(config, workdir, checkpoint=None) -> str:
    """Trains the autoregressive bit prior on the training codes, saves it to WORKDIR/prior,
    and reports bits/code on the test split against Bernoulli(0.5) and the empirical prior."""
    from dmz_jax import prior as prior_lib
    model = api.load(workdir, checkpoint=checkpoint, config=config)
    model._needs_latent()
    if config.model.latent_type != "binary":
        raise ModeError("train_prior models binary codes; this model's latent is "
                        f"{config.model.latent_type}")
    if epath.Path(model.prior_path).exists():
        raise ModeError(f"{model.prior_path} exists; move it away to train a new prior")
    o = config.modes
    train_codes = model.training_codes()
    test = data.load_split(config.data, "test", config.eval.probe_test_examples)
    test_codes = model.encode(test["image"])
    kwargs = {"width": o.prior_width}
    params = prior_lib.train_prior(train_codes, steps=o.prior_steps, seed=config.seed,
                                   model_kwargs=kwargs)
    prior_lib.save_prior(model.prior_path, params, kwargs)
    net = prior_lib.make_model(model.latent_dim, kwargs)
    out = output_dir(workdir, "train_prior")
    _write_json(os.path.join(out, "metrics.json"), {
        "learned_bits_per_code": prior_lib.bits_per_code(params, net, test_codes),
        "empirical_bits_per_code": prior_lib.empirical_bits_per_code(train_codes, test_codes),
        "bernoulli_bits_per_code": float(model.latent_dim),
        "train_codes": len(train_codes), "test_codes": len(test_codes), "step": model.step,
        "prior_steps": o.prior_steps, "saved_to": model.prior_path})
    return out


def mutual_information(config, workdir, checkpoint=None) -> str:
    """MINE's bound on I(x_t; z) along the forward and the reverse chain (modes.mi.*)."""
    from dmz_jax import mutual_information as mi
    return mi.run_mode(config, workdir, checkpoint)


def bits(config, workdir, checkpoint=None) -> str:
    """What each bit means: means, correlations, MI with the labels, flip rows (modes.per_bit.*)."""
    from dmz_jax import bit_meaning
    return bit_meaning.run_mode(config, workdir, checkpoint)


def train_bridge(config, workdir, checkpoint=None) -> str:
    """Trains the code bridge from modes.bridge.source_workdir's bits to this model's bits."""
    from dmz_jax import bridge
    return bridge.train_bridge_mode(config, workdir, checkpoint)


def translate(config, workdir, checkpoint=None) -> str:
    """Source-domain images -> source bits -> bridge -> this model's bits -> images."""
    from dmz_jax import bridge
    return bridge.translate_mode(config, workdir, checkpoint)


MODES = {"sample": sample, "encode": encode, "reconstruct": reconstruct,
         "interpolate": interpolate, "manipulate": manipulate, "train_prior": train_prior,
         "mutual_information": mutual_information, "bits": bits,
         "train_bridge": train_bridge, "translate": translate}
