"""--mode=bits: what each bit of z means.

    python -m dmz_jax.main --config=configs/fashion_mnist.py --workdir=W --mode=bits

From the exact codes of modes.per_bit.examples images of modes.split: each bit's mean, the
bit-bit correlations, and the mutual information (plug-in, in bits) between each bit and each
label: the classes one-vs-rest (and the class itself), or CelebA's 40 attributes. Then
modes.per_bit.flip_images images, inverted by DDIM (K = modes.steps), are decoded with their
own x_T and one bit flipped, one row per bit, which shows what the bit does to an image.

Writes W/bits/ (or W/bits.1, ...): bits.json, correlation.png, mi_bits_labels.png,
flips_K{K}.png and codes.npz. The statistics are numpy functions of the codes [N, |z|] in
{0, 1}; they are cheap next to the encoding and decoding.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Optional

import numpy as np
from etils import epath

from dmz_jax import data, modes
from dmz_jax.data import specs

ModeError = modes.ModeError

DEFINITIONS = {
    "mean": "P(bit = 1) over the examples",
    "entropy_bits": "H(bit) in bits: the most information the bit can carry",
    "mi_bits": "plug-in mutual information in bits from the count table of (bit, label): "
               "classes one-vs-rest I(bit; 1[class = c]), attributes I(bit; attribute)",
    "mi_class_bits": "I(bit; class) in bits over all classes at once (class labels only)",
    "best_label": "the label with the highest mi_bits; null when every MI is 0 (e.g. a "
                  "constant bit), and then accuracy, balanced_accuracy, label_when_bit too",
    "accuracy": "accuracy of the single-bit predictor of best_label: label = bit, or label = "
                "1 - bit when label_when_bit says 0; the polarity with the higher balanced "
                "accuracy is used",
    "balanced_accuracy": "(true-positive rate + true-negative rate) / 2 of that predictor; "
                         "0.5 when the label has only one value among the examples",
    "label_when_bit": "the bit value (0 or 1) that predicts the label",
    "correlation": "Pearson (phi) correlation of two bits; a constant bit has 0 with every "
                   "other bit and 1 with itself",
    "mean_abs_pixel_change": "mean over the flip images and pixels of |decode(z with the bit "
                             "flipped, x_T) - decode(z, x_T)|, pixels in [-1, 1] (x 127.5: 8-bit "
                             "levels); null for bits not flipped",
}


# --- statistics of codes [N, |z|] in {0, 1}


def bit_means(bits: np.ndarray) -> np.ndarray:
    """P(bit = 1) [|z|] of codes bits [N, |z|] in {0, 1}."""
    return np.asarray(bits, np.float64).mean(0)


def bit_entropies(bits: np.ndarray) -> np.ndarray:
    """H(bit) [|z|] in bits of codes [N, |z|] in {0, 1} (0 for a constant bit)."""
    p = np.stack([1 - bit_means(bits), bit_means(bits)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return 0.0 - np.where(p > 0, p * np.log2(p), 0.0).sum(0)  # 0.0 -: no -0.0


def bit_correlations(bits: np.ndarray) -> np.ndarray:
    """Pearson (phi) correlations [|z|, |z|] between the bits of codes [N, |z|] in {0, 1}.

    A constant bit (variance 0) has no defined correlation; it is given 0 with every other bit
    and 1 with itself, so the matrix never holds NaN.
    """
    x = np.asarray(bits, np.float64)
    centred = x - x.mean(0)
    covariance = centred.T @ centred / len(x)
    std = np.sqrt(np.diag(covariance))
    # a constant bit's centred values, so its covariances, are exactly 0: divided by 1, not 0
    scale = np.where(std > 0, std, 1.0)
    correlation = covariance / np.outer(scale, scale)
    np.fill_diagonal(correlation, 1.0)
    return np.clip(correlation, -1.0, 1.0)


def _mutual_information_from_counts(counts: np.ndarray) -> np.ndarray:
    """I(X; Y) in bits from joint counts (or probabilities) [..., X values, Y values]: the
    plug-in estimate sum p(x, y) log2 p(x, y) / (p(x) p(y)), with 0 log 0 = 0."""
    counts = np.asarray(counts, np.float64)
    p = counts / counts.sum((-2, -1), keepdims=True)
    independent = p.sum(-1, keepdims=True) * p.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / independent), 0.0)
    return np.maximum(terms.sum((-2, -1)), 0.0)  # rounding can give -1e-17


def one_vs_rest(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indicators 1[label = c] [N, num_classes] in {0, 1} of class labels [N] in 0..C-1."""
    return (np.asarray(labels)[:, None] == np.arange(num_classes)).astype(np.float64)


def class_mutual_information(bits: np.ndarray, labels: np.ndarray,
                             num_classes: int) -> np.ndarray:
    """I(bit; class) [|z|] in bits (plug-in) of codes [N, |z|] and class labels [N] in 0..C-1."""
    x, onehot = np.asarray(bits, np.float64), one_vs_rest(labels, num_classes)
    counts = np.stack([(1 - x).T @ onehot, x.T @ onehot], axis=1)  # [|z|, bit value, class]
    return _mutual_information_from_counts(counts)


def _joint_counts(bits: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """Counts [|z|, A, bit value, indicator value] of codes [N, |z|] and indicators [N, A]."""
    x, t = np.asarray(bits, np.float64), np.asarray(indicators, np.float64)
    on_on, on_off = x.T @ t, x.T @ (1 - t)
    off_on, off_off = (1 - x).T @ t, (1 - x).T @ (1 - t)
    return np.stack([np.stack([off_off, off_on], -1), np.stack([on_off, on_on], -1)], -2)


def indicator_mutual_information(bits: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """I(bit; indicator) [|z|, A] in bits (plug-in) of codes [N, |z|] and binary labels
    [N, A] in {0, 1}: CelebA's attributes, or one_vs_rest(classes)."""
    return _mutual_information_from_counts(_joint_counts(bits, indicators))


def single_bit_accuracy(bits: np.ndarray, indicators: np.ndarray) -> dict:
    """How well each bit alone predicts each binary label.

    Args: codes [N, |z|] and labels [N, A], both in {0, 1}.
    Returns: dict of [|z|, A] arrays: "label_when_bit" (1: predict label = bit; 0: label =
    1 - bit, whichever has the higher balanced accuracy), that predictor's "accuracy" and
    "balanced_accuracy" ((TPR + TNR) / 2; 0.5 where the label takes one value only).
    """
    counts = _joint_counts(bits, indicators)  # [|z|, A, bit, label]
    positives, negatives = counts[..., 1].sum(-1), counts[..., 0].sum(-1)
    both_present = (positives > 0) & (negatives > 0)
    tpr = counts[..., 1, 1] / np.maximum(positives, 1)  # of the predictor label = bit
    tnr = counts[..., 0, 0] / np.maximum(negatives, 1)
    balanced = np.where(both_present, (tpr + tnr) / 2, 0.5)
    accuracy = (counts[..., 1, 1] + counts[..., 0, 0]) / counts.sum((-2, -1))
    direct = balanced >= 0.5  # else the complement, whose rates are 1 - these
    return {"label_when_bit": np.where(direct, 1, 0),
            "accuracy": np.where(direct, accuracy, 1 - accuracy),
            "balanced_accuracy": np.where(direct, balanced, 1 - balanced)}


def best_labels(bits: np.ndarray, indicators: np.ndarray) -> dict:
    """For each bit, the binary label it carries most information about.

    Args: codes [N, |z|] and labels [N, A], both in {0, 1}.
    Returns: dict of [|z|] arrays: "index" of the label with the highest I(bit; label),
    "mi_bits" (that MI in bits), and the single_bit_accuracy entries of that label; where
    every MI is 0 (e.g. a constant bit) the bit predicts nothing: index -1, accuracies NaN.
    """
    mi = indicator_mutual_information(bits, indicators)
    index = np.argmax(mi, axis=1)
    rows = np.arange(len(index))
    accuracy = single_bit_accuracy(bits, indicators)
    best = {key: value[rows, index] for key, value in accuracy.items()}
    best["mi_bits"] = mi[rows, index]
    informative = best["mi_bits"] > 0
    best["index"] = np.where(informative, index, -1)
    for key in ("accuracy", "balanced_accuracy"):
        best[key] = np.where(informative, best[key], np.nan)
    return best


# --- pictures


def colour_map(values: np.ndarray, low: float, high: float, cell: int = 8) -> np.ndarray:
    """A matrix [R, C] as a picture [R * cell, C * cell, 3] uint8: blue at `low`, white
    half-way, red at `high` (values outside are clipped); each entry a cell x cell square."""
    t = np.clip((np.asarray(values, np.float64) - low) / (high - low), 0.0, 1.0)[..., None]
    blue, white, red = np.array([33, 102, 172]), np.array([255, 255, 255]), np.array([178, 24, 43])
    rgb = np.where(t < 0.5, blue + (white - blue) * 2 * t, white + (red - white) * (2 * t - 1))
    rgb = np.round(rgb).astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


def _save_heatmap(path: str, values: np.ndarray, high: float, title: str,
                  x_names: list[str], signed: bool) -> None:
    """values [R, C] (rows: bits) as a heat map PNG: signed, blue -high .. white 0 .. red high;
    else white 0 .. red high. matplotlib (its Agg canvas) with a colour bar and the column
    names, or, without matplotlib, colour_map's picture with 8 pixels a cell."""
    try:  # a Figure without pyplot: Agg, and no global backend switched in the caller
        from matplotlib.figure import Figure
    except ImportError:
        from dmz_jax import images
        images.save_png(path, colour_map(values, -high, high))
        logging.info("Wrote %s (no matplotlib: a plain colour map)", path)
        return
    rows, cols = values.shape
    height = min(2.5 + 0.12 * rows, 14)  # inches; square cells when signed (correlations)
    fig = Figure(figsize=(height + 1.5 if signed else min(3 + 0.16 * cols, 14), height))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu_r" if signed else "Reds", vmin=-high if signed else 0,
                      vmax=high, interpolation="nearest", aspect="equal" if signed else "auto")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("bit")
    every = 1 if cols <= 40 else cols // 16
    ax.set_xticks(np.arange(0, cols, every))
    ax.set_xticklabels(x_names[::every], rotation=90, fontsize=7)
    ax.set_yticks(np.arange(0, rows, 1 if rows <= 40 else rows // 16))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    epath.Path(path).write_bytes(buffer.getvalue())
    logging.info("Wrote %s", path)


# --- the mode


def _check_options(config) -> None:
    """ModeError for options the mode cannot run with, before anything is loaded."""
    m, o = config.model, config.modes
    if m.latent_type != "binary" or m.conditioning == "none":
        raise ModeError(f"--mode=bits reads binary codes; this model has model.latent_type="
                        f"{m.latent_type!r}, model.conditioning={m.conditioning!r}: use a "
                        "workdir trained with latent_type='binary'")
    p = o.per_bit
    if p.examples < 2:
        raise ModeError(f"modes.per_bit.examples={p.examples}: means and correlations need at "
                        "least 2 codes; use e.g. 2000")
    if p.flip_images < 0:
        raise ModeError(f"modes.per_bit.flip_images={p.flip_images}: use 0 (no flip rows) or more")
    bad = [b for b in p.flip_bits if not 0 <= b < m.latent_dim]
    if bad:
        raise ModeError(f"modes.per_bit.flip_bits={tuple(p.flip_bits)}: {bad} not in "
                        f"0..{m.latent_dim - 1}; use bits of that range, or () for every bit")
    if o.steps < 1:
        raise ModeError(f"modes.steps={o.steps}: K of the inversion must be at least 1")
    if o.split not in specs.SPLITS.get(config.data.name, (o.split,)):
        raise ModeError(f"modes.split={o.split!r} is not a split of {config.data.name}; use one "
                        f"of {list(specs.SPLITS[config.data.name])}")


def _labels(config, examples: dict) -> tuple:
    """(names, indicators [N, A] in {0, 1}, class labels [N] or None): CelebA's attributes
    (no class labels), or the classes one-vs-rest; (None, None, None) for a dataset without
    named labels."""
    try:
        names = modes.label_names(config)
    except ModeError:
        return None, None, None
    if "attributes" in examples:
        return names, np.asarray(examples["attributes"], np.float64), None
    return names, one_vs_rest(examples["label"], len(names)), examples["label"]


def _flip_rows(model, x: np.ndarray, flip_bits: list[int],
               steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Decodes images x [n, H, W, C] from their inverted (z, x_T) with each of flip_bits
    flipped, in one decode call. Returns (one row [n, H, W, C] per bit, the mean |pixel
    change| [len(flip_bits)] against the unflipped decoding, pixels in [-1, 1])."""
    z, x_T = model.invert(x, steps=steps)
    flipped = [z.copy() for _ in flip_bits]
    for code, b in zip(flipped, flip_bits):
        code[:, b] = 1.0 - code[:, b]
    repeated_x_T = np.tile(x_T, (1 + len(flip_bits),) + (1,) * (x_T.ndim - 1))
    decoded = model.decode(np.concatenate([z] + flipped), repeated_x_T, steps=steps,
                           method="ddim", eta=0.0)
    unflipped, *rows = np.split(decoded, 1 + len(flip_bits))
    change = np.array([np.abs(row - unflipped).mean() for row in rows])
    return rows, change


def _per_bit_table(bits, names, indicators, labels, change, flip_bits) -> list[dict]:
    """One dict per bit for bits.json (see DEFINITIONS)."""
    means, entropies = bit_means(bits), bit_entropies(bits)
    change_of = dict(zip(flip_bits, change))
    best = best_labels(bits, indicators) if names else None
    class_mi = (class_mutual_information(bits, labels, len(names))
                if names and labels is not None else None)
    table = []
    for b in range(bits.shape[1]):
        row = {"index": b, "mean": round(float(means[b]), 6),
               "entropy_bits": round(float(entropies[b]), 6)}
        if best is not None:
            i = int(best["index"][b])
            row.update(best_label=names[i] if i >= 0 else None,
                       mi_bits=round(float(best["mi_bits"][b]), 6),
                       accuracy=_number(best["accuracy"][b]),
                       balanced_accuracy=_number(best["balanced_accuracy"][b]),
                       label_when_bit=int(best["label_when_bit"][b]) if i >= 0 else None)
        if class_mi is not None:
            row["mi_class_bits"] = round(float(class_mi[b]), 6)
        row["mean_abs_pixel_change"] = (round(float(change_of[b]), 6) if b in change_of
                                        else None)
        table.append(row)
    return table


def _number(value) -> Optional[float]:
    """A JSON number rounded to 6 decimals; None for NaN."""
    return None if np.isnan(value) else round(float(value), 6)


def _strongest_pairs(correlation: np.ndarray, count: int = 10) -> list[dict]:
    """The `count` bit pairs (i < j) with the largest |correlation|."""
    i, j = np.triu_indices(len(correlation), k=1)
    order = np.argsort(-np.abs(correlation[i, j]), kind="stable")[:count]
    return [{"bits": [int(i[k]), int(j[k])],
             "correlation": round(float(correlation[i[k], j[k]]), 4)} for k in order]


def _write_flips(model, out: str, x: np.ndarray, config) -> tuple[list[int], np.ndarray]:
    """flips_K{K}.png of images x [n, H, W, C] (none when n = 0): the inputs, then a row per
    flipped bit. Returns (the flipped bits, their mean |pixel change| [len(bits)])."""
    o = config.modes
    if not len(x):
        return [], np.zeros(0)
    flip_bits = [int(b) for b in o.per_bit.flip_bits] or list(range(model.latent_dim))
    rows, change = _flip_rows(model, x, flip_bits, o.steps)
    modes._grid(os.path.join(out, f"flips_K{o.steps}.png"), [x] + rows)
    return flip_bits, change


def run_mode(config, workdir: str, checkpoint: Optional[int] = None) -> str:
    """--mode=bits (module docstring); returns the output folder."""
    _check_options(config)
    o, p = config.modes, config.modes.per_bit
    split = data.load_split(config.data, o.split, max(p.examples, p.flip_images))
    if len(split["image"]) < 2:
        raise ModeError(f"split {o.split!r} of {config.data.name} has "
                        f"{len(split['image'])} images; the statistics need at least 2")
    model, out = modes._start(config, workdir, checkpoint, "bits")
    examples = {key: value[:p.examples] for key, value in split.items()}
    bits = model.encode(examples["image"]).astype(np.uint8)
    flip_bits, change = _write_flips(model, out, split["image"][:p.flip_images], config)
    correlation = bit_correlations(bits)
    _save_heatmap(os.path.join(out, "correlation.png"), correlation, 1.0,
                  f"bit-bit correlation ({len(bits)} codes of {o.split})",
                  [str(b) for b in range(bits.shape[1])], signed=True)
    names, indicators, labels = _labels(config, examples)
    result = {"step": model.step, "latent_dim": int(bits.shape[1]), "examples": len(bits),
              "options": {"split": o.split, "steps": o.steps, "examples": p.examples,
                          "flip_images": p.flip_images, "flip_bits": flip_bits},
              "definitions": DEFINITIONS, "labels": list(names) if names else None}
    arrays = {"bits": bits, "correlation": correlation, "labels": examples["label"]}
    if "attributes" in examples:
        arrays["attributes"] = examples["attributes"]
    if names:
        arrays["mi_bits"] = mi = indicator_mutual_information(bits, indicators)
        kind = "classes one-vs-rest" if labels is not None else "attributes"
        _save_heatmap(os.path.join(out, "mi_bits_labels.png"), mi, max(mi.max(), 1e-3),
                      f"I(bit; label) in bits, {kind}", list(names), signed=False)
        result["mi_table"] = {"rows": "bits", "columns": list(names), "kind": kind,
                              "mi_bits": np.round(mi, 6).tolist()}
    else:
        result["mi_omitted"] = (f"{config.data.name} has no named labels: means, correlations "
                                "and flips only")
    result["per_bit"] = _per_bit_table(bits, names, indicators, labels, change, flip_bits)
    result["strongest_correlations"] = _strongest_pairs(correlation)
    modes._write_npz(os.path.join(out, "codes.npz"), **arrays)
    modes._write_json(os.path.join(out, "bits.json"), result)
    return out
