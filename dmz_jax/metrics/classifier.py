"""A small CNN classifier whose penultimate layer gives features for an offline Frechet distance.

For Fashion-MNIST (32x32x1) without network access. Distances in these features are NOT
comparable to published FID (which uses InceptionV3 on ImageNet); label them as such.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

FEATURE_DIM = 128


class Classifier(nn.Module):
    """[B, H, W, C] float in [-1, 1] -> (features [B, FEATURE_DIM], logits [B, num_classes])."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for width in (16, 32, 64):  # stride 2 each: 32x32 -> 4x4
            x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(self.num_classes)(features)


def train_classifier(images, labels, steps: int, seed: int, batch_size: int = 64,
                     learning_rate: float = 3e-3, num_classes: int = 10) -> dict:
    """Adam on softmax cross-entropy over random minibatches; returns the params.

    Args:
      images: [N, H, W, C] float in [-1, 1]; labels: [N] ints in [0, num_classes).
    A jitted step in a Python loop: on CPU, XLA runs convolutions inside lax.scan ~15x slower.
    """
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    model = Classifier(num_classes)
    params = jax.jit(model.init)(jax.random.key(seed), images[:1])["params"]
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(params):
            _, logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        params, opt_state = step(params, opt_state, images[idx], labels[idx])
    return params


@jax.jit
def _apply(params, images):
    return Classifier(num_classes=params["Dense_1"]["bias"].shape[0]).apply(
        {"params": params}, images)


def _outputs(params, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    outputs = [_apply(params, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate([np.asarray(o[j]) for o in outputs]) for j in range(2))


def features(params, images, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features [N, FEATURE_DIM] float32 of images [N, H, W, C] in [-1, 1]."""
    return _outputs(params, images, batch_size)[0]


def accuracy(params, images, labels, batch_size: int = 512) -> float:
    """Fraction of images [N, H, W, C] whose argmax logit equals labels [N]."""
    predictions = _outputs(params, images, batch_size)[1].argmax(-1)
    return float((predictions == np.asarray(labels)).mean())
