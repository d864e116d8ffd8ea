"""Tests for pneumoscan.data.cache: decode once, re-decode on change, survive interruption."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pneumoscan.data import cache, pipeline
from pneumoscan.data.cache import Shard, cache_root, cached_decode, config_key
from pneumoscan.data.pipeline import decode_all
from pneumoscan.data.preprocess import PreprocessConfig, decode_to_uint8
from pneumoscan.progress import Reporter
from pneumoscan.train.loop import TrainOptions, _decode_splits, prepare_split, train

from conftest import FIXTURES, fixture_images


def _no_decoding(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("decoded although the cache holds the image")


def _paths(tmp_path: Path, n: int = 6) -> list[str]:
    """Real X-rays of both classes plus one corrupt file, in a writable folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = fixture_images("NORMAL")[: n // 2] + fixture_images("PNEUMONIA")[: n // 2]
    paths = []
    for source in sources:
        shutil.copy(source, folder / source.name)
        paths.append(str(folder / source.name))
    bad = folder / "truncated.jpeg"
    bad.write_bytes(sources[0].read_bytes()[:300])
    return [*paths[:2], str(bad), *paths[2:]]


def _assert_same(got: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[0].dtype == np.uint8
    assert got[1].tolist() == expected[1].tolist()
    assert got[2] == expected[2]


def test_results_equal_decode_all_and_second_pass_is_a_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(tmp_path)
    config = PreprocessConfig()
    expected = decode_all(paths, config)
    seen: list[int] = []
    first = cached_decode(paths, config, tmp_path / "cache", on_progress=seen.append)
    _assert_same(first, expected)
    assert sum(seen) == len(paths) and isinstance(first[0], np.memmap)
    monkeypatch.setattr(pipeline, "decode_to_uint8", _no_decoding)
    second = cached_decode(paths, config, tmp_path / "cache")
    _assert_same(second, expected)


def test_changed_file_is_decoded_again(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    config = PreprocessConfig()
    cached_decode(paths, config, tmp_path / "cache")
    replacement = fixture_images("PNEUMONIA")[-1]
    Path(paths[0]).write_bytes(replacement.read_bytes())
    pixels, kept, _ = cached_decode(paths, config, tmp_path / "cache")
    assert kept[0] == 0
    np.testing.assert_array_equal(pixels[0], decode_to_uint8(replacement, config))


def test_changed_config_uses_another_key(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    small = PreprocessConfig(image_size=(64, 64))
    equalized = PreprocessConfig(intensity="equalize")
    assert len({config_key(PreprocessConfig()), config_key(small), config_key(equalized)}) == 3
    cached_decode(paths, PreprocessConfig(), tmp_path / "cache")
    pixels, _, _ = cached_decode(paths, small, tmp_path / "cache")
    assert pixels.shape[1:] == (64, 64, 3)
    _assert_same(cached_decode(paths, equalized, tmp_path / "cache"), decode_all(paths, equalized))
    assert len(list((tmp_path / "cache").glob("v1-*"))) == 3


def test_corrupt_file_is_recorded_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(tmp_path)
    config = PreprocessConfig()
    _, kept, errors = cached_decode(paths, config, tmp_path / "cache")
    assert 2 not in kept.tolist() and errors[0][0] == 2 and "truncated.jpeg" in errors[0][1].message
    index = json.loads((Shard(tmp_path / "cache", config).index_path).read_text())
    assert list(index["errors"].values()) == [errors[0][1].message]
    assert list(index["error_types"].values()) == [errors[0][1].error_type]
    monkeypatch.setattr(pipeline, "decode_to_uint8", _no_decoding)
    assert cached_decode(paths, config, tmp_path / "cache")[2] == errors


def test_interrupted_write_leaves_a_usable_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(tmp_path, n=12)
    config = PreprocessConfig()
    real_batches = cache.iter_decoded_batches
    real_append = Shard.append
    calls: list[int] = []

    def small_batches(
        files: Sequence[str], cfg: PreprocessConfig, batch_size: int = 64
    ) -> Iterator[pipeline.DecodedBatch]:
        return real_batches(files, cfg, batch_size=4)

    def dying_append(self: Shard, pixels: np.ndarray, hashes: Sequence[str]) -> None:
        calls.append(len(hashes))
        if len(calls) == 1:
            real_append(self, pixels, hashes)
            return
        with open(self.rows_path, "ab") as handle:  # half a row, then the process "dies"
            handle.write(b"\x01" * (self.row_bytes // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "iter_decoded_batches", small_batches)
    monkeypatch.setattr(cache, "_COMMIT_EVERY", 1)
    monkeypatch.setattr(Shard, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        cached_decode(paths, config, tmp_path / "cache")
    monkeypatch.setattr(Shard, "append", real_append)

    decoded: list[str] = []

    def counting(path: str, cfg: PreprocessConfig) -> np.ndarray:
        decoded.append(path)
        return decode_to_uint8(path, cfg)

    monkeypatch.setattr(pipeline, "decode_to_uint8", counting)
    result = cached_decode(paths, config, tmp_path / "cache")
    monkeypatch.setattr(pipeline, "decode_to_uint8", decode_to_uint8)
    _assert_same(result, decode_all(paths, config))
    # The first, committed batch (3 images and the corrupt file) was not decoded again.
    assert len(decoded) == len(paths) - 4
    shard = Shard(tmp_path / "cache", config)
    assert shard.rows_path.stat().st_size == len(result[1]) * shard.row_bytes


def test_cache_root_follows_argument_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PNEUMOSCAN_CACHE")
    assert cache_root() == Path.home() / ".cache" / "pneumoscan"


def test_decode_splits_gives_the_same_rows_with_and_without_cache(tmp_path: Path) -> None:
    options = TrainOptions(data=str(FIXTURES), out=str(tmp_path / "run"), val_fraction=0.25)
    table = prepare_split(options, Reporter(quiet=True))
    config = PreprocessConfig()
    ram = _decode_splits(table, config, Reporter(quiet=True), use_cache=False)
    mapped = _decode_splits(table, config, Reporter(quiet=True), tmp_path / "cache")
    np.testing.assert_array_equal(mapped[0], ram[0])
    np.testing.assert_array_equal(mapped[1], ram[1])
    pd.testing.assert_frame_equal(mapped[3], ram[3])
    assert isinstance(mapped[0], np.memmap)
    # Same rows per split, in the same relative order, as the table's own order gives.
    for split in ("train", "val"):
        paths = table.loc[table["split"] == split, "path"].tolist()
        assert mapped[3].loc[mapped[3]["split"] == split, "path"].tolist() == paths


def test_training_with_the_cache_matches_training_without(tmp_path: Path) -> None:
    runs = {}
    for name, use_cache in (("ram", False), ("cached", True)):
        out = tmp_path / name
        options = TrainOptions(data=str(FIXTURES), out=str(out), epochs=1, val_fraction=0.25)
        result = train(options, cache_dir=tmp_path / "cache", use_cache=use_cache)
        config = json.loads((out / "config.json").read_text())
        runs[name] = (result, config, pd.read_csv(out / "split.csv"))
    (ram, ram_config, ram_split), (cached, cached_config, cached_split) = runs.values()
    pd.testing.assert_frame_equal(ram_split, cached_split)
    assert ram_config["split"] == cached_config["split"]
    assert ram_config["data_fingerprint"] == cached_config["data_fingerprint"]
    assert ram.validation["n"] == cached.validation["n"]
    assert ram.validation["auc"] == pytest.approx(cached.validation["auc"], abs=1e-6)


def test_an_index_without_error_types_still_gives_its_failures(tmp_path: Path) -> None:
    # Caches written before error types were recorded hold only the messages.
    paths = _paths(tmp_path)
    config = PreprocessConfig()
    _, _, errors = cached_decode(paths, config, tmp_path / "cache")
    index_path = Shard(tmp_path / "cache", config).index_path
    index = json.loads(index_path.read_text())
    del index["error_types"]
    index_path.write_text(json.dumps(index))
    again = cached_decode(paths, config, tmp_path / "cache")[2]
    assert [(p, f.path, f.message) for p, f in again] == [(p, f.path, f.message) for p, f in errors]
    assert {f.error_type for _, f in again} == {"ImageReadError"}
