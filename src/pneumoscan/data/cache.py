"""Decode once: an on-disk, memory-mapped cache of preprocessed uint8 images.

Layout under the cache root (``~/.cache/pneumoscan``, ``$PNEUMOSCAN_CACHE`` or an argument)::

    v1-<config key>/config.json   the PreprocessConfig the shard holds (for people, not code)
    v1-<config key>/rows.u8       raw (H, W, 3) uint8 rows, appended as images are decoded
    v1-<config key>/index.json    {"n_rows", "rows": {sha1: row}, "errors": {sha1 path: message}}
    v1-<config key>/views/*.npy   a table-ordered copy of rows, memory-mapped by training

The key of a shard is a hash of :meth:`PreprocessConfig.to_dict`, and rows are found by the
file's content hash, so a changed setting or a changed file is decoded again. Writes are
crash-safe: rows are written and flushed before the index that points at them is replaced
atomically, and rows beyond the index's ``n_rows`` (a killed run's) are cut off on opening.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.data.dataset import file_sha1
from pneumoscan.data.pipeline import iter_decoded_batches
from pneumoscan.data.preprocess import DecodeFailure, PreprocessConfig
from pneumoscan.jsonio import atomic_write

try:  # POSIX only; elsewhere concurrent writers are simply not guarded.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "PNEUMOSCAN_CACHE"
_FORMAT = "v1"
#: New rows written between index commits: bounds the work a killed run loses.
_COMMIT_EVERY = 256
#: Table-ordered views kept per shard (older ones are deleted).
_KEEP_VIEWS = 4
_COPY_CHUNK = 256


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: the argument, else ``$PNEUMOSCAN_CACHE``, else ``~/.cache/pneumoscan``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "pneumoscan"


def config_key(config: PreprocessConfig) -> str:
    """A short, stable hash of the preprocessing settings."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class Shard:
    """The rows of one preprocessing config, and the index from content hash to row."""

    def __init__(self, root: Path, config: PreprocessConfig) -> None:
        self.config = config
        self.folder = root / f"{_FORMAT}-{config_key(config)}"
        self.rows_path = self.folder / "rows.u8"
        self.index_path = self.folder / "index.json"
        height, width = config.image_size
        self.row_shape = (height, width, 3)
        self.row_bytes = height * width * 3
        self.rows: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.error_types: dict[str, str] = {}
        self.n_rows = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[Shard]:
        """Open (creating if needed) under an exclusive lock, so two runs never interleave."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                yield self
            finally:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> None:
        config_file = self.folder / "config.json"
        if not config_file.exists():
            _atomic_write_text(config_file, json.dumps(self.config.to_dict(), indent=1))
        index: dict[str, Any] = {"n_rows": 0, "rows": {}, "errors": {}}
        if self.index_path.exists():
            with contextlib.suppress(ValueError, OSError):
                index = json.loads(self.index_path.read_text())
        size = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        n_rows = int(index.get("n_rows", 0))
        if size < n_rows * self.row_bytes:
            # Rows the index points at are gone (file deleted or damaged): start afresh.
            kept = {key: index.get(key, {}) for key in ("errors", "error_types")}
            index, n_rows = {"n_rows": 0, "rows": {}} | kept, 0
        if size != n_rows * self.row_bytes:
            # A killed run appended rows it never indexed; they are cut off, not trusted.
            with open(self.rows_path, "ab") as handle:
                handle.truncate(n_rows * self.row_bytes)
        self.n_rows = n_rows
        self.rows = {str(k): int(v) for k, v in index.get("rows", {}).items()}
        self.errors = {str(k): str(v) for k, v in index.get("errors", {}).items()}
        self.error_types = {str(k): str(v) for k, v in index.get("error_types", {}).items()}

    def commit(self) -> None:
        """Make appended rows durable, then point the index at them (atomically)."""
        index = {
            "n_rows": self.n_rows,
            "rows": self.rows,
            "errors": self.errors,
            "error_types": self.error_types,
        }
        _atomic_write_text(self.index_path, json.dumps(index))

    def append(self, pixels: np.ndarray, hashes: Sequence[str]) -> None:
        """Write rows (flushed to disk) and remember them; :meth:`commit` publishes them."""
        with open(self.rows_path, "ab") as handle:
            handle.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        for offset, sha1 in enumerate(hashes):
            self.rows.setdefault(sha1, self.n_rows + offset)
        self.n_rows += len(hashes)

    def record_failure(self, sha1: str, failure: DecodeFailure) -> None:
        """Remember that this content at this path cannot be decoded (not retried)."""
        key = _error_key(sha1, failure.path)
        self.errors[key] = failure.message
        self.error_types[key] = failure.error_type

    def failure(self, sha1: str, path: str) -> DecodeFailure | None:
        """The recorded failure of this content at this path, if any."""
        key = _error_key(sha1, path)
        if key not in self.errors:
            return None
        # Indexes written before error types were kept hold only the message; every decode
        # failure is at least an ImageReadError.
        return DecodeFailure(path, self.errors[key], self.error_types.get(key, "ImageReadError"))

    def memmap(self) -> np.ndarray:
        """All committed rows, read-only and memory-mapped."""
        if self.n_rows == 0:
            return np.zeros((0, *self.row_shape), np.uint8)
        return np.memmap(self.rows_path, np.uint8, mode="r", shape=(self.n_rows, *self.row_shape))


def _error_key(sha1: str, path: str) -> str:
    # Messages name the file, so an error belongs to (content, path), not to content alone.
    return f"{sha1} {path}"


def _hash_files(paths: Sequence[str]) -> list[str | None]:
    """Content hashes; a file that cannot be read gets ``None`` (decoding reports why)."""
    hashes: list[str | None] = []
    for path in paths:
        try:
            # Hashed here, decoded from the path later: a file rewritten in between would be
            # stored under its old hash, a race not worth a second read of every file.
            hashes.append(file_sha1(path))
        except OSError:
            hashes.append(None)
    return hashes


def _decode_missing(
    shard: Shard,
    paths: Sequence[str],
    hashes: Sequence[str | None],
    missing: list[int],
    on_progress: Callable[[int], None] | None,
) -> dict[int, DecodeFailure]:
    """Decode the positions not in the cache, append them, and return uncacheable errors."""
    uncached_errors: dict[int, DecodeFailure] = {}
    pending = 0
    miss_paths = [paths[i] for i in missing]
    for batch in iter_decoded_batches(miss_paths, shard.config, batch_size=64):
        new_hashes: list[str] = []
        keep: list[int] = []
        for row, local in enumerate(batch.indices):
            sha1 = hashes[missing[local]]
            # Duplicate contents in one batch are stored once.
            if sha1 is not None and sha1 not in shard.rows and sha1 not in new_hashes:
                new_hashes.append(sha1)
                keep.append(row)
        if keep:
            shard.append(batch.pixels[keep], new_hashes)
            pending += len(keep)
        for local, failure in batch.errors:
            position = missing[local]
            sha1 = hashes[position]
            if sha1 is None:
                uncached_errors[position] = failure
            else:
                shard.record_failure(sha1, failure)
        if batch.errors or pending >= _COMMIT_EVERY:
            shard.commit()
            pending = 0
        if on_progress:
            on_progress(len(batch.indices) + len(batch.errors))
    shard.commit()
    return uncached_errors


def _table_view(shard: Shard, rows: np.ndarray) -> np.ndarray:
    """The given shard rows in the given order, memory-mapped.

    Contiguous ascending rows are a slice of the shard itself; otherwise a copy is built once
    (chunk by chunk, so memory stays small) and reused for the same order.
    """
    store = shard.memmap()
    if len(rows) == 0:
        return store[:0]
    if np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return store[rows[0] : rows[0] + len(rows)]
    views = shard.folder / "views"
    views.mkdir(exist_ok=True)
    digest = hashlib.sha1(rows.astype(np.int64).tobytes(), usedforsecurity=False).hexdigest()
    target = views / f"{digest[:20]}.npy"
    if not target.exists():
        with atomic_write(target) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *shard.row_shape)
            )
            for start in range(0, len(rows), _COPY_CHUNK):
                chunk = rows[start : start + _COPY_CHUNK]
                order = np.argsort(chunk, kind="stable")
                # Sorted reads from the shard, written back in the requested order.
                out[start + order] = store[chunk[order]]
            out.flush()
            del out
    else:
        os.utime(target)
    _prune_views(views)
    return np.load(target, mmap_mode="r")


def _prune_views(views: Path) -> None:
    found = sorted(views.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in found[_KEEP_VIEWS:]:
        with contextlib.suppress(OSError):
            old.unlink()


def cached_decode(
    paths: Sequence[str],
    config: PreprocessConfig,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, DecodeFailure]]]:
    """Like :func:`pneumoscan.data.pipeline.decode_all`, but decoding only what the cache lacks.

    Args:
        paths: Image files.
        config: Preprocessing; part of the cache key.
        cache_dir: Cache root (default: :func:`cache_root`).
        on_progress: Called with the number of files done, as they are done.

    Returns:
        ``(pixels, kept_positions, errors)`` as ``decode_all`` returns them, except that
        ``pixels`` is a read-only memory map on disk.
    """
    shard = Shard(cache_root(cache_dir), config)
    with shard.locked():
        hashes = _hash_files(paths)
        missing = [
            i
            for i, sha1 in enumerate(hashes)
            if sha1 is None or (sha1 not in shard.rows and shard.failure(sha1, paths[i]) is None)
        ]
        if on_progress and len(paths) > len(missing):
            on_progress(len(paths) - len(missing))
        uncached = _decode_missing(shard, paths, hashes, missing, on_progress) if missing else {}
        kept: list[int] = []
        rows: list[int] = []
        errors: list[tuple[int, DecodeFailure]] = []
        for position, sha1 in enumerate(hashes):
            if sha1 is not None and sha1 in shard.rows:
                kept.append(position)
                rows.append(shard.rows[sha1])
                continue
            failure = uncached[position] if sha1 is None else shard.failure(sha1, paths[position])
            assert failure is not None  # decoded above: a row or a recorded failure
            errors.append((position, failure))
        pixels = _table_view(shard, np.asarray(rows, dtype=np.int64))
    return pixels, np.asarray(kept, dtype=int), errors
