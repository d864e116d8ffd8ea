"""DICOM input: files written by pydicom from real X-rays, decoded as a viewer would show them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.data.dicom import looks_like_dicom, read_dicom, write_dicom
from pneumoscan.data.preprocess import decode_image, decode_to_uint8, load_image
from pneumoscan.errors import ImageReadError

from conftest import SITE_SAMPLE, fixture_images

TWELVE_BITS = 4095


def _xray() -> Path:
    """A real X-ray: from the site sample when the shared data is there, else a fixture."""
    found = sorted(SITE_SAMPLE.glob("PNEUMONIA/*.jpeg"))
    return found[0] if found else fixture_images("PNEUMONIA")[0]


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """The X-ray's 8-bit grey levels."""
    return np.asarray(Image.open(_xray()).convert("L"))


def _twelve_bit(grey: np.ndarray) -> np.ndarray:
    # Exact inverse of the full-range mapping, so decoding gives back the 8-bit values.
    return np.round(grey.astype(np.float64) * TWELVE_BITS / 255).astype(np.uint16)


@pytest.fixture(scope="module")
def twins(grey: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same radiograph as MONOCHROME2 and as MONOCHROME1 (stored values inverted)."""
    folder = tmp_path_factory.mktemp("dicom")
    stored = _twelve_bit(grey)
    window = (2048.0, 4096.0)
    mono2 = write_dicom(stored, folder / "mono2.dcm", "MONOCHROME2", 12, window)
    mono1 = write_dicom(TWELVE_BITS - stored, folder / "mono1.dcm", "MONOCHROME1", 12, window)
    return mono2, mono1


def test_monochrome1_decodes_like_its_monochrome2_twin(
    twins: tuple[Path, Path], grey: np.ndarray
) -> None:
    mono2, mono1 = (read_dicom(p.read_bytes()) for p in twins)
    np.testing.assert_array_equal(mono1, mono2)
    assert np.abs(mono2.astype(int) - grey).max() <= 1


def test_monochrome1_gets_the_same_prediction(twins: tuple[Path, Path]) -> None:
    from pneumoscan.inference.scorer import p_pneumonia
    from pneumoscan.models.modelfile import load_model

    model = load_model()
    pixels = np.stack([decode_to_uint8(p) for p in (*twins, _xray())])
    p = p_pneumonia(model, pixels)
    assert p[0] == p[1]
    assert abs(p[0] - p[2]) < 0.02  # vs the JPEG it came from (12-bit round trip)


def test_window_centre_and_width_are_applied(grey: np.ndarray, tmp_path: Path) -> None:
    stored = _twelve_bit(grey)
    centre, width = 2500.0, 1000.0
    path = write_dicom(stored, tmp_path / "windowed.dcm", window=(centre, width))
    decoded = read_dicom(path.read_bytes()).astype(float)
    # DICOM's linear window (PS3.3 C.11.2.1.2.1), mapped to 0..255.
    expected = np.clip(((stored - (centre - 0.5)) / (width - 1) + 0.5), 0, 1) * 255
    assert np.abs(decoded - expected).max() <= 1
    assert (decoded == 0).mean() > (np.asarray(grey) < 5).mean()  # below-window pixels black


def test_voi_lut_sequence_is_applied(grey: np.ndarray, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = _twelve_bit(grey)
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: 4096 entries, 8-bit output
    table = np.clip(np.arange(4096) // 8, 0, 255).astype(np.uint16)  # halves the contrast
    lut.add_new(0x00283006, "US", table.tolist())  # LUT Data
    path = write_dicom(stored, tmp_path / "lut.dcm", extra={"VOILUTSequence": Sequence([lut])})
    decoded = read_dicom(path.read_bytes()).astype(float)
    assert np.abs(decoded - table[stored]).max() <= 1


def test_rescale_slope_and_intercept_are_applied(grey: np.ndarray, tmp_path: Path) -> None:
    stored = _twelve_bit(grey).astype(np.int32) * 2 + 1000
    path = write_dicom(
        stored, tmp_path / "rescaled.dcm", bits_stored=14, window=(2048.0, 4096.0),
        rescale=(0.5, -500.0),
    )  # fmt: skip
    plain = write_dicom(_twelve_bit(grey), tmp_path / "plain.dcm", window=(2048.0, 4096.0))
    rescaled, reference = read_dicom(path.read_bytes()), read_dicom(plain.read_bytes())
    # The window's output range follows the rescale, so only rounding differs.
    assert np.abs(rescaled.astype(int) - reference).max() <= 1


def test_without_window_the_full_range_is_shown(grey: np.ndarray, tmp_path: Path) -> None:
    stored = (_twelve_bit(grey) // 4).astype(np.uint16)  # uses 10 of 12 bits
    decoded = read_dicom(write_dicom(stored, tmp_path / "raw.dcm").read_bytes())
    assert decoded.min() == 0 and decoded.max() == 255


def test_inverse_presentation_lut_shape_flips(grey: np.ndarray, tmp_path: Path) -> None:
    stored = _twelve_bit(grey)
    path = write_dicom(
        stored, tmp_path / "inverse.dcm", window=(2048.0, 4096.0),
        extra={"PresentationLUTShape": "INVERSE"},
    )  # fmt: skip
    assert np.abs(read_dicom(path.read_bytes()).astype(int) - (255 - grey)).max() <= 1


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes(grey: np.ndarray, tmp_path: Path, syntax: str) -> None:
    stored = _twelve_bit(grey)
    path = write_dicom(stored, tmp_path / "c.dcm", window=(2048.0, 4096.0), transfer_syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert np.abs(read_dicom(path.read_bytes()).astype(int) - grey).max() <= 1


def test_jpeg_baseline_dicom_from_a_pacs(tmp_path: Path) -> None:
    """The common PACS case: the original JPEG stream encapsulated in a DICOM file."""
    source = _xray()
    jpeg = Image.open(source).convert("L")
    buffer = io.BytesIO()
    jpeg.save(buffer, format="JPEG", quality=95)
    path = write_dicom(np.asarray(jpeg), tmp_path / "jpeg.dcm", bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    decoded = read_dicom(path.read_bytes()).astype(int)
    assert np.abs(decoded - np.asarray(jpeg)).mean() < 2


def test_multi_frame_is_refused_with_a_clear_message(grey: np.ndarray, tmp_path: Path) -> None:
    frames = np.stack([grey, grey[::-1]])
    path = write_dicom(frames, tmp_path / "cine.dcm", bits_stored=8)
    with pytest.raises(ImageReadError, match=r"multi-frame DICOM \(2 frames\).*single-frame"):
        load_image(path)


def test_undecodable_compression_names_the_packages(twins: tuple[Path, Path]) -> None:
    ds = pydicom.dcmread(twins[0])
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ImageReadError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        read_dicom(buffer.getvalue(), "mpeg.dcm")


def test_dicom_without_pixels_is_refused(tmp_path: Path, twins: tuple[Path, Path]) -> None:
    ds = pydicom.dcmread(twins[0])
    del ds.PixelData
    path = tmp_path / "report.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="holds no image"):
        load_image(path)


def test_format_is_found_by_content_not_extension(twins: tuple[Path, Path], tmp_path: Path) -> None:
    dicom_as_jpeg = tmp_path / "scan.jpg"
    dicom_as_jpeg.write_bytes(twins[0].read_bytes())
    jpeg_as_dicom = tmp_path / "scan.dcm"
    jpeg_as_dicom.write_bytes(_xray().read_bytes())
    assert decode_image(dicom_as_jpeg).source_format == "DICOM"
    assert decode_image(jpeg_as_dicom).source_format == "JPEG"
    np.testing.assert_array_equal(decode_to_uint8(dicom_as_jpeg), decode_to_uint8(twins[0]))
    # A raw data set (no preamble, no DICM), as some old archives keep them.
    ds = pydicom.dcmread(twins[0])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = buffer.getvalue()
    raw = raw[raw.index(b"\x08\x00") :] if not raw.startswith(b"\x08\x00") else raw
    assert looks_like_dicom(raw)
    np.testing.assert_array_equal(decode_to_uint8(raw), decode_to_uint8(twins[0]))


def test_colour_dicom_is_read_as_rgb(tmp_path: Path) -> None:
    rgb = np.asarray(Image.open(_xray()).convert("RGB"))
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(rgb, "RGB", 8)
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "capture.dcm"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(np.asarray(load_image(path)), rgb)


def test_predict_cli_reads_dicom_twins_alike(twins: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    result = CliRunner().invoke(app, ["predict", *map(str, twins), "--json", str(out)])
    assert result.exit_code == 0, result.output
    first, second = json.loads(out.read_text())["results"]
    assert first["status"] == second["status"] == "ok"
    assert first["probability"] == second["probability"]
