"""fashion_mnist_edges: Fashion-MNIST with each garment replaced by its binary edge map.

The same examples as `fashion_mnist` (same sources, splits, order and labels), so row i of a
split pairs with row i of fashion_mnist's: the offline stand-in for Edges2Handbags'
edges -> photo pairs (dmz_jax/bridge.py, --mode=train_bridge / translate).

The edge filter, fixed: the garment padded to data.image_size as fashion_mnist does (black
background), u = (x + 1) / 2 in [0, 1]; the Sobel gradient magnitude
    |g| = sqrt(gx^2 + gy^2),  gx = u * [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],  gy = gx's kernel^T
(cross-correlation, zero padding outside the frame, i.e. more black background; a unit
step gives |g| = 4); a pixel is an edge where |g| > EDGE_THRESHOLD = 1.0 (a step of a
quarter of the range). Output: one channel, edges +1 (white) on -1 (black), binary.
"""

from dmz_jax.data import fashion_mnist, specs, tfds_source  # before TF: hides the GPUs

import tensorflow as tf

EDGE_THRESHOLD = 1.0  # on the Sobel magnitude of the [0, 1] image (a unit step: 4)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))

examples = fashion_mnist.examples  # the same undecoded examples, in the same order


def edge_map(image: tf.Tensor) -> tf.Tensor:
    """[S, S, 1] float32 in [-1, 1] -> its binary edge map [S, S, 1], +1 edge, -1 not."""
    sobel_x = tf.constant(_SOBEL_X)
    kernels = tf.stack([sobel_x, tf.transpose(sobel_x)], axis=-1)[:, :, None, :]  # [3,3,1,2]
    u = (image[None] + 1.0) / 2.0
    g = tf.nn.conv2d(u, kernels, strides=1, padding="SAME")[0]  # zero padding
    magnitude = tf.sqrt(tf.reduce_sum(tf.square(g), axis=-1, keepdims=True))
    return tf.where(magnitude > EDGE_THRESHOLD, 1.0, -1.0)


def example_fn(data_cfg):
    """Example -> {"image": its edge map float32 [S, S, 1] in {-1, 1}, "label": int32 []}."""
    garment = tfds_source.example_fn(data_cfg)  # padded as fashion_mnist

    def fn(ex):
        ex = garment(ex)
        return {**ex, "image": edge_map(ex["image"])}
    return fn


def dataset_info(data_cfg) -> specs.DatasetInfo:
    info = fashion_mnist.dataset_info(data_cfg)
    return specs.DatasetInfo("fashion_mnist_edges", info.image_size, info.channels,
                             info.num_classes, info.num_train_examples, info.source)
