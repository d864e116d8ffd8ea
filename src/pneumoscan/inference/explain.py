"""Where the model looked: Grad-CAM heatmaps and their overlays.

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last convolutional feature map by
the mean gradient of the class score and keeps the positive part. The score here is the
pneumonia logit (log-odds), not the softmax probability: a probability near 1 has a vanishing
gradient and would give an empty map exactly for the most confident images.

:func:`gradcam` is pure (a batch of images in, a batch of maps out) and :func:`overlay_png`
returns PNG bytes, so the CLI, the HTML report and the web service all draw the same figure.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pneumoscan.constants import POSITIVE_INDEX
from pneumoscan.data.preprocess import to_model_input
from pneumoscan.formatting import format_probability, format_threshold
from pneumoscan.inference.prediction import Prediction, reading

if TYPE_CHECKING:
    import keras

#: The layer EfficientNet-Lite names its last feature map; used when present.
PREFERRED_LAYER = "top_activation"
#: Layers that move or resample a feature map without computing new features.
_PASS_THROUGH = (
    "Pooling",
    "Dropout",
    "ZeroPadding",
    "Cropping",
    "Reshape",
    "Flatten",
    "SpatialDropout",
    "GaussianNoise",
    "Resizing",
    "Rescaling",
)
_EPS = 1e-7


def _is_feature_map_layer(layer: Any) -> bool:
    """A layer whose output is a 4-D ``(batch, height, width, channels)`` computed map."""
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4 or type(layer).__name__ == "InputLayer":
        return False
    if shape[1] is None or shape[2] is None or shape[1] < 2 or shape[2] < 2:
        return False
    return not any(kind in type(layer).__name__ for kind in _PASS_THROUGH)


def feature_map_layers(network: keras.Model) -> list[str]:
    """Names of the layers that output spatial feature maps, in network order."""
    return [layer.name for layer in network.layers if _is_feature_map_layer(layer)]


def last_conv_layer(network: keras.Model) -> str:
    """The Grad-CAM target: ``top_activation`` if the network has it, else the last layer
    whose output is a 4-D feature map (a convolution or what follows it: activation, batch
    normalisation), skipping pooling, dropout, padding and reshaping layers.

    Raises:
        ValueError: The network has no spatial feature map (not a convolutional network).
    """
    names = {layer.name for layer in network.layers}
    if PREFERRED_LAYER in names:
        return PREFERRED_LAYER
    candidates = feature_map_layers(network)
    if not candidates:
        raise ValueError(f"{network.name}: no 4-D convolutional feature map to explain")
    return candidates[-1]


@contextmanager
def _capturing(target: Any, head: Any) -> Iterator[dict[str, Any]]:
    """Record the target layer's output and the head's input during one eager forward pass.

    A sub-model returning an intermediate output gives a copy that the rest of the network
    does not use, so its gradient would be None; wrapping ``call`` records the very tensor
    the downstream layers consume. The instance attributes are removed afterwards, which
    restores the layers' own methods (so this is not safe across threads on one network).
    """
    captured: dict[str, Any] = {}
    target_call, head_call = target.call, head.call

    def record_output(*args: Any, **kwargs: Any) -> Any:
        captured["feature_map"] = target_call(*args, **kwargs)
        return captured["feature_map"]

    def record_input(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        captured["head_input"] = inputs
        return head_call(inputs, *args, **kwargs)

    target.call, head.call = record_output, record_input
    try:
        yield captured
    finally:
        del target.call, head.call


def _logit_score(head_input: Any, probabilities: Any, head: Any, classes: Any) -> Any:
    """Each image's log-odds of its class (``classes``: one index per image).

    A Dense head's logits are recomputed from its input and weights (the log-odds of a
    softmax class is its logit minus the log-sum-exp of the others; a one-unit sigmoid head's
    logit is the log-odds of class 1). Any other head falls back to log(p / (1 - p)).
    """
    import tensorflow as tf  # lazy: loads TensorFlow

    if type(head).__name__ == "Dense":
        logits = tf.matmul(head_input, head.kernel)
        if head.bias is not None:
            logits = logits + head.bias
        if logits.shape[-1] == 1:
            sign = tf.where(classes == 1, 1.0, -1.0)
            return sign * logits[:, 0]
        chosen = tf.gather(logits, classes, axis=1, batch_dims=1)
        others = tf.where(
            tf.one_hot(classes, logits.shape[-1]) > 0, tf.fill(tf.shape(logits), -1e9), logits
        )
        return chosen - tf.reduce_logsumexp(others, axis=1)
    p = tf.clip_by_value(probabilities, _EPS, 1.0 - _EPS)
    chosen = tf.gather(p, classes, axis=1, batch_dims=1)
    return tf.math.log(chosen) - tf.math.log1p(-chosen)


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one ``(h, w)`` map to ``size = (height, width)``."""
    height, width = size
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32)
    image = Image.fromarray(heatmap.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def gradcam(
    network: keras.Model,
    image_batch: np.ndarray,
    layer: str | None = None,
    class_index: int | Sequence[int] | np.ndarray = POSITIVE_INDEX,
) -> np.ndarray:
    """Grad-CAM heatmaps of the evidence for a class, for a batch of images.

    Args:
        network: A Keras classifier with a convolutional feature map (TensorFlow backend).
        image_batch: ``(n, H, W, 3)``: uint8 pixels (scaled like every model input) or the
            float32 model input in [0, 1].
        layer: Feature-map layer to explain (default: :func:`last_conv_layer`).
        class_index: Class whose evidence is shown: one for all images (default PNEUMONIA)
            or one per image (e.g. each image's decision).

    Returns:
        ``(n, H, W)`` float32 maps in [0, 1] at the input's size; each is scaled by its own
        maximum, and is all zeros when nothing in the image raised the score.
    """
    import tensorflow as tf  # lazy: loads TensorFlow

    batch = np.asarray(image_batch)
    if batch.ndim != 4:
        raise ValueError(f"expected a batch (n, H, W, 3), got shape {batch.shape}")
    inputs = to_model_input(batch) if batch.dtype == np.uint8 else batch.astype(np.float32)
    target = network.get_layer(layer or last_conv_layer(network))
    head = network.layers[-1]
    tensor = tf.convert_to_tensor(inputs)
    classes = tf.constant(np.broadcast_to(np.asarray(class_index, np.int32), (len(batch),)))
    with _capturing(target, head) as captured, tf.GradientTape() as tape:
        probabilities = network(tensor, training=False)
        feature_map = captured["feature_map"]
        score = _logit_score(captured["head_input"], probabilities, head, classes)
        # Each image's score depends on that image only: the sum's gradient is per image.
        total = tf.reduce_sum(score)
    gradients = tape.gradient(total, feature_map)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy().astype(np.float64)
    cams = np.nan_to_num(cams, nan=0.0, posinf=0.0, neginf=0.0)
    peaks = cams.reshape(len(cams), -1).max(axis=1)[:, None, None]
    # Each map is relative to its own peak; gradients can be tiny (1e-13), so no fixed floor.
    cams = np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)
    size = inputs.shape[1:3]
    return np.stack([resize_heatmap(cam, size) for cam in cams]).clip(0.0, 1.0)


def overlay_png(
    image: np.ndarray,
    heatmap: np.ndarray,
    title: str,
    path: str | Path | None = None,
    max_side: int = 640,
    alpha: float = 0.45,
) -> bytes:
    """Draw the X-ray in grey with the heatmap in colour over it, titled, as PNG bytes.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8 X-ray, at any size (the heatmap is resized
            to it, so the original aspect ratio can be shown).
        heatmap: ``(h, w)`` map in [0, 1].
        title: Figure title, e.g. from :func:`heatmap_title`.
        path: Also write the PNG there.
        max_side: The longer side of the drawn image, in pixels, at most.
        alpha: Opacity of the heatmap at its maximum.

    Returns:
        The PNG file's bytes.
    """
    from matplotlib.figure import Figure  # lazy: loads matplotlib

    grey = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).convert("L"))
    scale = min(1.0, max_side / max(grey.shape))
    if scale < 1.0:
        new_size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = np.asarray(Image.fromarray(grey).resize(new_size, Image.Resampling.BOX))
    cam = resize_heatmap(np.nan_to_num(heatmap, nan=0.0), grey.shape)
    height, width = grey.shape
    dpi = 100
    figure = Figure(figsize=(width / dpi * 1.25, height / dpi), dpi=dpi)
    axes = figure.add_axes((0.0, 0.0, 0.8, 1.0))
    axes.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    # Transparent where the map is zero, so unexplained areas stay plain grey.
    shown = axes.imshow(cam, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha * cam)
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    colour_axes = figure.add_axes((0.83, 0.1, 0.03, 0.8))
    bar = figure.colorbar(shown, cax=colour_axes)
    bar.set_label("Grad-CAM (relative)", fontsize=8)
    if bar.solids is not None:
        bar.solids.set_alpha(1.0)
    buffer = io.BytesIO()
    # A tight box keeps the title and the colour bar's label inside the image.
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def heatmap_title(name: str, prediction: Prediction) -> str:
    """The overlay's title: file, the score against the threshold in words (close to the
    threshold: read with care), and whose evidence the colours show.

    An ``ok`` prediction is needed (one with a probability, threshold and decision).
    """
    probability = float(prediction.probability or 0.0)
    threshold = float(prediction.threshold or 0.0)
    shown = format_probability(probability, threshold)
    return (
        f"{name}\nP(pneumonia) {shown}, threshold {format_threshold(threshold)}: "
        f"{reading(probability, threshold)}\ncolour: evidence for {prediction.decision}"
    )
