"""Hostile files, round 2 (issue 22): each is refused from what it declares, before the
allocation or the work it asks for, within seconds and without large allocations."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bombs
from pneumoscan.data import preprocess
from pneumoscan.data.dataset import read_header, scan_dataset
from pneumoscan.data.formats import codestream_size, sniff_format
from pneumoscan.data.limits import MIN_IMAGE_SIDE
from pneumoscan.data.preprocess import PreprocessConfig, decode_image, try_decode_image
from pneumoscan.errors import (
    DecodeTimeoutError,
    FileTooLargeError,
    ImageReadError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidInputError,
    UnsupportedFormatError,
)

SMALL = PreprocessConfig(image_size=(32, 32))


def _peak_mb(action: object) -> float:
    """Peak Python allocations (bytes objects, arrays) of ``action()``, in MB."""
    tracemalloc.start()
    try:
        action()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


# 1. Deflated DICOM
def test_a_deflated_dicom_bomb_is_refused_before_it_is_inflated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = bombs.deflated_dicom(8192)  # 128 MiB of pixels in ~190 kB
    assert len(bomb) < 300_000
    monkeypatch.setenv("PNEUMOSCAN_MAX_FILE_MB", "4")

    def refuse() -> None:
        with pytest.raises(ImageTooLargeError, match="inflates to more than 4 MB"):
            decode_image(bomb, SMALL)

    assert _peak_mb(refuse) < 24  # pydicom alone inflated all 128 MiB


def test_a_genuine_deflated_dicom_still_decodes() -> None:
    decoded = decode_image(bombs.deflated_dicom(512, real_side=224), PreprocessConfig())
    assert decoded.source_format == "DICOM" and decoded.original_size == (512, 512)
    assert decoded.display[:96, :96].max() > 100 > decoded.display[120:, 120:].max()  # X-ray kept


# 2. Codestreams that disagree with the DICOM header
@pytest.mark.parametrize("build", [bombs.dicom_jpeg, bombs.dicom_j2k], ids=["JPEG", "J2K"])
def test_a_codestream_larger_than_the_header_is_refused_undecoded(build: object) -> None:
    data = build(1024, header_side=512)  # type: ignore[operator]
    started = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"says 512 x 512.*codestream holds 1024 x 1024"):
        preprocess._decode_image(data, SMALL)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("build", [bombs.dicom_jpeg, bombs.dicom_j2k], ids=["JPEG", "J2K"])
def test_a_codestream_over_the_budget_is_refused_by_its_real_size(
    build: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pneumoscan.data.limits.MAX_PIXELS", 500_000)
    with pytest.raises(ImageTooLargeError, match=r"1024 x 1024 pixels"):
        preprocess._decode_image(build(1024, header_side=512), SMALL)  # type: ignore[operator]


@pytest.mark.parametrize("build", [bombs.dicom_jpeg, bombs.dicom_j2k], ids=["JPEG", "J2K"])
def test_a_genuine_compressed_dicom_still_decodes(build: object) -> None:
    decoded = decode_image(build(256, header_side=256), SMALL)  # type: ignore[operator]
    assert decoded.original_size == (256, 256)


def test_jpeg_ls_and_jp2_headers_give_the_real_size() -> None:
    # JPEG-LS (SOF55): precision 16, 3000 rows, 2500 columns, 1 component.
    jpeg_ls = b"\xff\xd8\xff\xf7\x00\x0b\x10" + struct.pack(">HH", 3000, 2500) + b"\x01\x01\x11\x00"
    assert codestream_size(jpeg_ls, "JPEG") == (2500, 3000, 1)
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bombs.j2k_codestream(96)
    assert codestream_size(jp2, "JPEG 2000")[:2] == (96, 96)
    with pytest.raises(ImageReadError, match="no valid JPEG frame header"):
        codestream_size(b"\xff\xd8\xff\xda\x00\x02", "JPEG")


# 3. Scan bombs and the decode deadline
def test_a_scan_bomb_is_refused_by_its_scan_count() -> None:
    bomb = bombs.scan_bomb(side=1024, repeats=2000)
    started = time.perf_counter()
    failure = try_decode_image(bomb, SMALL, name="scans.jpeg")
    assert isinstance(failure, preprocess.DecodeFailure)
    assert "JPEG of 20" in failure.message and "scan bomb" in failure.message
    assert time.perf_counter() - started < 0.5


def test_the_decode_deadline_stops_a_slow_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the scan count allowed, only the deadline stands between the bomb and the core.
    monkeypatch.setattr(preprocess, "MAX_JPEG_SCANS", 10**9)
    monkeypatch.setenv("PNEUMOSCAN_DECODE_SECONDS", "0.2")
    bomb = bombs.scan_bomb(side=4096, repeats=3000)  # about 3.5 s undisturbed
    started = time.perf_counter()
    failure = try_decode_image(bomb, SMALL, name="scans.jpeg")
    elapsed = time.perf_counter() - started
    assert isinstance(failure, preprocess.DecodeFailure)
    assert failure.error_type == DecodeTimeoutError.__name__
    assert "longer than the 0.2 s limit" in failure.message
    assert elapsed < 1.5


def test_a_bad_deadline_setting_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCAN_DECODE_SECONDS", "soon")
    with pytest.raises(InvalidInputError, match="PNEUMOSCAN_DECODE_SECONDS='soon'"):
        decode_image(bombs.jpeg_codestream(64), SMALL)


# 4. One firewall for the readers of data sets
def test_the_data_set_scan_records_hostile_files_as_unreadable(tmp_path: Path) -> None:
    normal, pneumonia = tmp_path / "NORMAL", tmp_path / "PNEUMONIA"
    normal.mkdir()
    pneumonia.mkdir()
    bombs.xray(224).save(normal / "good.jpeg")
    bombs.xray(224).save(pneumonia / "good.jpeg")
    bombs.write(normal / "bomb.png", bombs.png_bomb(40000))  # DecompressionBombError in Pillow
    bombs.write(normal / "scans.jpeg", bombs.scan_bomb(side=1024, repeats=500))
    bombs.xray(224).save(normal / "animated.png", "GIF")
    bombs.write(normal / "deflated.png", bombs.deflated_dicom(8192))
    bombs.xray(32).save(normal / "thumb.png")
    table = scan_dataset(tmp_path)
    errors = dict(zip(table["path"].map(lambda p: Path(p).name), table["error"], strict=True))
    assert errors["good.jpeg"] == ""
    assert "megapixel limit" in errors["bomb.png"]
    assert "scan bomb" in errors["scans.jpeg"]
    assert errors["animated.png"].startswith("GIF files are not accepted")
    assert "inflates to more than" in errors["deflated.png"]
    assert "minimum side" in errors["thumb.png"]


def test_read_header_never_raises(tmp_path: Path) -> None:
    assert read_header(tmp_path / "missing.png")[3] == "no such file"
    assert read_header(bombs.write(tmp_path / "empty.png", b""))[3] == "empty file (0 bytes)"
    assert read_header(bombs.write(tmp_path / "bomb.png", bombs.png_bomb(20000)))[:3] == (0, 0, 0)


# 6. The minimum resolution
def test_an_image_below_the_minimum_side_is_refused_not_scored() -> None:
    buffer = io.BytesIO()
    bombs.xray(32).save(buffer, "PNG")
    with pytest.raises(ImageTooSmallError, match="32 x 32 pixels is below the 64-pixel"):
        decode_image(buffer.getvalue(), SMALL)
    buffer = io.BytesIO()
    bombs.xray((MIN_IMAGE_SIDE, 300)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), SMALL).original_size == (MIN_IMAGE_SIDE, 300)


def test_a_small_dicom_is_refused_too(tmp_path: Path) -> None:
    from pneumoscan.data.dicom import write_dicom

    path = write_dicom(np.full((40, 300), 100, np.uint16), tmp_path / "thin.dcm")
    with pytest.raises(ImageTooSmallError, match="300 x 40 pixels"):
        decode_image(path, SMALL)


# 8. The cap on bytes read per file
def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "huge.dcm"
    with open(huge, "wb") as file:
        file.truncate(2 * 2**30)  # 2 GB, sparse: no disk used, and must not be read

    def refuse() -> None:
        failure = try_decode_image(huge, SMALL)
        assert isinstance(failure, preprocess.DecodeFailure)
        assert failure.error_type == FileTooLargeError.__name__
        assert "2048 MB is over the 128 MB limit" in failure.message

    assert _peak_mb(refuse) < 5
    assert "over the 128 MB limit" in read_header(huge)[3]


@pytest.mark.parametrize("kind", ["path", "bytes", "file object"])
def test_the_cap_is_configurable_and_covers_every_source(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMOSCAN_MAX_FILE_MB", "0.5")
    data = bombs.xray(1024).tobytes()[:600_000]
    path = bombs.write(tmp_path / "big.bin", data)
    source = {"path": path, "bytes": data, "file object": io.BytesIO(data)}[kind]
    with pytest.raises(FileTooLargeError, match=r"over the 0\.5 MB limit"):
        decode_image(source, SMALL)  # type: ignore[arg-type]


# 12. Only the formats an X-ray comes in
@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "PDF", "JPEG2000", "ICO", "PPM", "TGA"])
def test_other_formats_are_refused_by_name_before_any_decoder(fmt: str) -> None:
    buffer = io.BytesIO()
    bombs.xray(128).convert("RGB").save(buffer, fmt)
    failure = try_decode_image(buffer.getvalue(), SMALL, name="x")
    assert isinstance(failure, preprocess.DecodeFailure)
    if fmt == "TGA":  # no magic bytes: not recognised at all
        assert failure.message == "x: not an image (unrecognised format)"
    else:
        assert failure.error_type == UnsupportedFormatError.__name__
        assert "files are not accepted (accepted: JPEG, PNG, TIFF, DICOM)" in failure.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_accepted_formats_are_sniffed(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, fmt)
    assert sniff_format(buffer.getvalue()[:512], "x") == fmt


def test_a_png_header_on_a_gif_body_is_not_read_as_gif() -> None:
    # The decoder is chosen by the sniffed format alone; Pillow may not fall back to another.
    buffer = io.BytesIO()
    bombs.xray(128).save(buffer, "GIF")
    forged = b"\x89PNG\r\n\x1a\n" + buffer.getvalue()[8:]
    with pytest.raises(ImageReadError, match=r"damaged PNG header|damaged or truncated"):
        preprocess._decode_image(forged, SMALL)
