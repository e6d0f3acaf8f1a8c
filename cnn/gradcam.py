"""Grad-CAM (Selvaraju et al. 2017): where in the image a classifier's melanoma evidence lies.

Works on any classifier from `cnn.backbones.build_classifier` (preprocessing layers, one backbone
sub-model, dropout, a Dense head), whatever the backbone: the feature map explained is the
backbone's deepest one that still has a spatial extent, found from the layers' output shapes.
"""

from __future__ import annotations

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from PIL import Image

# Layers whose output is no feature map of the image: the input itself, and zero borders.
NOT_FEATURE_MAPS: tuple[type[keras.layers.Layer], ...] = (keras.layers.InputLayer, keras.layers.ZeroPadding2D)


def gradcam_map(feature_map: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM of one image: channels weighted by their mean gradient and summed, scaled to [0, 1].

    `feature_map` and `gradients` are (h, w, channels). The paper clips negative evidence at 0;
    small from-scratch models often carry the melanoma score in the head's bias, so no position is
    positive and the clipped map would be blank. Min-max scaling instead always shows where the
    evidence is strongest (1) and weakest (0) within the image; a uniform map is all zero.
    """
    cam = feature_map @ gradients.mean(axis=(0, 1))
    span = cam.max() - cam.min()
    return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def resize_map(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A heat map resized (bilinear) to an image's size."""
    return np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the heat map in the jet colour map blended in where the heat is (uint8 RGB).

    Blending in proportion to the heat keeps the lesion visible where the model found no evidence.
    """
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    return np.clip(image * (1 - weight) + colours * weight, 0, 255).astype(np.uint8)


def last_feature_map_layer(backbone: keras.Model) -> keras.layers.Layer:
    """The backbone's last layer whose output is a 4-D map with more than one spatial position."""
    for layer in reversed(backbone.layers):
        shape = layer.output.shape
        if not isinstance(layer, NOT_FEATURE_MAPS) and len(shape) == 4 and shape[1] * shape[2] > 1:
            return layer
    raise ValueError(f"backbone {backbone.name!r} has no spatial feature map to explain.")


class GradCam:
    """Grad-CAM maps of one classifier for one output class (the pre-activation score of that unit)."""

    def __init__(self, model: keras.Model, class_index: int) -> None:
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        backbones = [i for i, layer in enumerate(layers) if isinstance(layer, keras.Model)]
        if len(backbones) != 1 or not isinstance(layers[-1], keras.layers.Dense):
            raise ValueError(
                f"model {model.name!r}: Grad-CAM needs a classifier from cnn.backbones.build_classifier "
                "(preprocessing layers, one backbone sub-model, a Dense head)."
            )
        split = backbones[0]
        backbone = layers[split]
        self.preprocess, self.between, self.head = layers[:split], layers[split + 1 : -1], layers[-1]
        self.features = keras.Model(backbone.inputs, [last_feature_map_layer(backbone).output, backbone.outputs[0]])
        self.class_index = class_index

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Maps (N, h, w) in [0, 1] for float32 RGB [0, 255] images (N, size, size, 3) at the model's size."""
        x = tf.convert_to_tensor(images, dtype=tf.float32)
        for layer in self.preprocess:
            x = layer(x, training=False)
        with tf.GradientTape() as tape:
            feature_map, pooled = self.features(x, training=False)
            for layer in self.between:
                pooled = layer(pooled, training=False)
            pooled = tf.cast(pooled, self.head.kernel.dtype)  # a mixed-precision body feeds a float32 head
            logits = tf.matmul(pooled, self.head.kernel) + (self.head.bias if self.head.use_bias else 0.0)
            score = logits[:, self.class_index]
        gradients = tape.gradient(score, feature_map).numpy()
        return np.stack([gradcam_map(f, g) for f, g in zip(feature_map.numpy(), gradients)])
