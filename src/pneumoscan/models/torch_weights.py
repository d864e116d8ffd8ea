"""Read PyTorch checkpoints (``torch.save`` of a state dict) into NumPy arrays without torch.

A ``.pth`` file is a pickle, and unpickling can run arbitrary code, so the pickle is read by
:class:`RestrictedUnpickler`: it resolves only the handful of globals a state dict of plain
tensors needs, replaces them with inert NumPy stand-ins, and refuses everything else before
anything is called. Both container formats are read:

* zip (``torch.save`` since PyTorch 1.6): ``<root>/data.pkl`` plus one ``<root>/data/<key>``
  member of raw bytes per storage;
* legacy (before 1.6): five pickles in a row (magic number, protocol, system info, the object,
  the storage keys), each storage then stored as an int64 element count and its raw bytes.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "RestrictedUnpickler",
    "StorageRef",
    "TensorRef",
    "UnsafeCheckpointError",
    "load_torch_state_dict",
    "materialize_state_dict",
    "parameter_count",
    "restricted_load",
]

# torch.save writes this number first in the legacy format (torch/serialization.py).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> little-endian NumPy dtype; bfloat16 has no NumPy dtype, so its raw
# 16-bit words are read and widened to float32 in _decode_storage.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle references something other than tensors and dicts."""


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint of the expected layout, or it is damaged."""


class _Sealed:
    """Base of the loader's objects: refuses the pickle ``BUILD`` opcode, which would let a
    checkpoint rewrite their attributes (and, for shared ones, poison later loads)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("checkpoint tries to modify an object of the loader")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """Inert stand-in for a ``torch.<Type>Storage`` class named in the pickle."""

    name: str


@dataclass(frozen=True)
class StorageRef(_Sealed):
    """A storage the pickle points at; its bytes live outside the pickle.

    Attributes:
        key: Storage key (the zip member ``data/<key>`` or a legacy storage id).
        storage_type: Torch class name, e.g. ``FloatStorage``.
        numel: Number of elements the storage holds.
    """

    key: str
    storage_type: str
    numel: int


@dataclass(frozen=True)
class TensorRef(_Sealed):
    """A tensor as ``torch._utils._rebuild_tensor_v2`` describes it: a strided storage view."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` that records the view, reads nothing."""
    del requires_grad, backward_hooks, metadata  # autograd state means nothing to NumPy
    if not isinstance(storage, StorageRef):
        raise UnsafeCheckpointError("tensor rebuilt from something other than a storage")
    return TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: TensorRef, requires_grad: bool, backward_hooks: Any) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its tensor here."""
    del requires_grad, backward_hooks
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds state dicts of tensors and nothing else.

    Every global resolves to an inert stand-in from a fixed allow-list (so no constructor of
    the pickle's choosing ever runs); tensors come back as :class:`TensorRef` placeholders
    whose bytes are read later by :func:`materialize_state_dict`.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allow-listed global or raise :class:`UnsafeCheckpointError`."""
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name!r} from a checkpoint: only tensors and "
                "dicts are allowed (a pickle that names other objects can run arbitrary code)"
            ) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        """Turn a ``('storage', type, key, location, numel[, view])`` record into a reference."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointFormatError(
                "storage views (pre-0.4 PyTorch checkpoints) are unsupported"
            )
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"persistent id names a non-storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError(f"malformed storage record {pid!r:.80}")
        return StorageRef(key=key, storage_type=storage_type.name, numel=numel)


def restricted_load(file: IO[bytes]) -> Any:
    """Unpickle one object from ``file`` with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeCheckpointError: The pickle references a global outside the allow-list.
    """
    return RestrictedUnpickler(file).load()


def _decode_storage(raw: bytes, ref: StorageRef, byteorder: str = "little") -> np.ndarray:
    """Interpret a storage's raw bytes as a 1-D array of its element type (native order)."""
    dtype = np.dtype(_STORAGE_DTYPES[ref.storage_type])
    if byteorder == "big":
        dtype = dtype.newbyteorder(">")
    expected = ref.numel * dtype.itemsize
    if len(raw) < expected:
        raise CheckpointFormatError(
            f"storage {ref.key}: {len(raw)} bytes, expected {expected} (file truncated?)"
        )
    values = np.frombuffer(raw, dtype=dtype, count=ref.numel)
    if ref.storage_type == "BFloat16Storage":
        # bfloat16 is the upper half of a float32, so shifting the word up is exact.
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(dtype.newbyteorder("="), copy=False)


def _tensor_from_storage(tensor: TensorRef, storage: np.ndarray) -> np.ndarray:
    """Copy the strided view a tensor describes out of its storage, checking its bounds."""
    if any(dim < 0 for dim in tensor.shape) or len(tensor.shape) != len(tensor.stride):
        raise CheckpointFormatError(f"malformed tensor shape {tensor.shape} / {tensor.stride}")
    if math.prod(tensor.shape) == 0:
        return np.zeros(tensor.shape, dtype=storage.dtype)
    # as_strided does not check bounds, so reading past the storage must be ruled out here.
    reach = [(dim - 1) * step for dim, step in zip(tensor.shape, tensor.stride, strict=True)]
    first = tensor.offset + sum(min(extent, 0) for extent in reach)
    last = tensor.offset + sum(max(extent, 0) for extent in reach)
    if first < 0 or last >= storage.size:
        raise CheckpointFormatError(
            f"tensor view (offset {tensor.offset}, shape {tensor.shape}, stride {tensor.stride}) "
            f"lies outside its storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset :],
        shape=tensor.shape,
        strides=tuple(step * storage.itemsize for step in tensor.stride),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


def materialize_state_dict(obj: Any, storages: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace the :class:`TensorRef` values of an unpickled state dict by NumPy arrays.

    Args:
        obj: What :func:`restricted_load` returned; must map names to tensors.
        storages: Decoded storages by key.

    Raises:
        CheckpointFormatError: ``obj`` is not a flat name -> tensor mapping, or a storage is
            missing.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state: dict[str, np.ndarray] = {}
    for name, tensor in obj.items():
        if not isinstance(name, str) or not isinstance(tensor, TensorRef):
            raise CheckpointFormatError(f"state dict entry {name!r} is not a named tensor")
        if tensor.storage.key not in storages:
            raise CheckpointFormatError(f"{name}: storage {tensor.storage.key} is missing")
        state[name] = _tensor_from_storage(tensor, storages[tensor.storage.key])
    return state


def _storage_refs(obj: Any) -> dict[str, StorageRef]:
    """Storages referenced by the tensors of an unpickled state dict, by key."""
    values = obj.values() if isinstance(obj, Mapping) else []
    return {value.storage.key: value.storage for value in values if isinstance(value, TensorRef)}


def _load_zip(archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"expected one */data.pkl in the zip, found {len(pickles)}")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{root}byteorder" in archive.namelist():
        byteorder = archive.read(f"{root}byteorder").decode("ascii").strip()
    obj = restricted_load(io.BytesIO(archive.read(pickles[0])))
    storages = {}
    for key, ref in _storage_refs(obj).items():
        try:
            raw = archive.read(f"{root}data/{key}")
        except KeyError:
            raise CheckpointFormatError(f"zip member {root}data/{key} is missing") from None
        storages[key] = _decode_storage(raw, ref, byteorder)
    return materialize_state_dict(obj, storages)


def _load_legacy(file: IO[bytes]) -> dict[str, np.ndarray]:
    if restricted_load(file) != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError("not a PyTorch checkpoint (neither zip nor legacy magic)")
    if restricted_load(file) != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError("unsupported legacy PyTorch checkpoint protocol")
    sys_info = restricted_load(file)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointFormatError("big-endian legacy checkpoints are unsupported")
    obj = restricted_load(file)
    keys = restricted_load(file)
    refs = _storage_refs(obj)
    storages = {}
    for key in keys:
        # Each storage: int64 element count, then its bytes, in the order of ``keys``.
        (numel,) = struct.unpack("<q", file.read(8))
        ref = refs.get(key)
        if ref is None or numel != ref.numel:
            raise CheckpointFormatError(f"storage {key}: header does not match the pickle")
        itemsize = np.dtype(_STORAGE_DTYPES[ref.storage_type]).itemsize
        storages[key] = _decode_storage(file.read(numel * itemsize), ref)
    return materialize_state_dict(obj, storages)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into NumPy arrays, without importing torch.

    Args:
        path: A ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``.

    Returns:
        Parameter and buffer names mapped to arrays (native byte order, original dtypes;
        bfloat16 widened to float32).

    Raises:
        UnsafeCheckpointError: The pickle references anything but tensors and dicts.
        CheckpointFormatError: The file is not a state dict checkpoint or is damaged.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _load_zip(archive)
        with path.open("rb") as file:
            return _load_legacy(file)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile) as exc:
        raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


def parameter_count(state: Mapping[str, np.ndarray], skip_buffers: bool = True) -> int:
    """Number of values in a state dict.

    Args:
        state: Names mapped to arrays.
        skip_buffers: Leave out batch-norm running statistics and counters, which are not
            trained parameters.
    """
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(
        int(array.size)
        for name, array in state.items()
        if not (skip_buffers and name.rsplit(".", 1)[-1] in buffers)
    )
