"""The web service's API on real X-rays, through FastAPI's TestClient (no server, no network)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import nonxray
from pneumoscan.cli import app as cli_app
from pneumoscan.inference.scorer import subtype_head
from pneumoscan.models.subtype import BACTERIAL, SUBTYPE_LABEL, VIRAL
from pneumoscan.serve.app import API_KEY_HEADER, WEB_DIR, Engine, create_app
from pneumoscan.serve.schemas import PredictResponse

from conftest import SITE_SAMPLE, fixture_images

MB = 1024 * 1024
KEY = "correct horse battery staple"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The shipped model, loaded once and shared by every app in this module."""
    loaded = Engine.load()
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine=engine)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def subtype_client(subtype_model: Path) -> Iterator[TestClient]:
    """A model with a bacterial-or-viral head, opened as ``pneumoscan serve --model`` opens it."""
    with TestClient(create_app(model_path=subtype_model)) as test_client:
        deadline = time.monotonic() + 300
        while test_client.get("/health").status_code != 200:
            assert test_client.get("/health").json()["status"] == "loading"
            assert time.monotonic() < deadline, "the subtype model did not load"
            time.sleep(0.2)
        yield test_client


def _scoring_subtype(model: Path) -> dict[str, Any]:
    """The subtype entry of the file that scores for ``model`` (its int8 export when it has
    one, whose threshold was refitted on the int8 features)."""
    from pneumoscan.inference.backends import open_model

    return dict(open_model(model, "auto")[0].metadata["subtype"])


def upload(path: Path, name: str | None = None) -> tuple[str, tuple[str, bytes, str]]:
    """A ``files`` form entry for a file on disk."""
    return ("files", (name or path.name, path.read_bytes(), "application/octet-stream"))


def upload_bytes(name: str, data: bytes) -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (name, data, "application/octet-stream"))


def real_xrays() -> list[Path]:
    """Real X-rays of both classes: the site sample when present, else the repo's fixtures."""
    if SITE_SAMPLE.is_dir():
        return [
            *sorted((SITE_SAMPLE / "PNEUMONIA").glob("*.jpeg"))[:3],
            *sorted((SITE_SAMPLE / "NORMAL").glob("*.jpeg"))[:3],
        ]
    return [*fixture_images("PNEUMONIA")[:3], *fixture_images("NORMAL")[:3]]


def natural_png(name: str) -> bytes:
    """A natural image (scikit-image's sample photos) as PNG bytes."""
    return next(nonxray.png_bytes(pixels) for n, pixels in nonxray.natural_images() if n == name)


def decode_png(encoded: str) -> Image.Image:
    data = base64.b64decode(encoded)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_health_reports_ready_once_the_model_is_loaded(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() | {"version": None} == {
        "live": True, "ready": True, "status": "ready", "detail": None, "version": None,
    }  # fmt: skip


def test_real_xrays_are_scored_in_upload_order(client: TestClient, engine: Engine) -> None:
    files = real_xrays()
    response = client.post("/v1/predict", files=[upload(p) for p in files])
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == engine.name
    results = body["results"]
    assert [r["filename"] for r in results] == [p.name for p in files]
    threshold = engine.model.threshold
    for result in results:
        assert result["status"] == "ok", result
        assert 0.0 <= result["probability"] <= 1.0
        expected = "PNEUMONIA" if result["probability"] >= threshold else "NORMAL"
        assert result["decision"] == expected and result["threshold"] == threshold
        assert result["reason"] is None and result["heatmap"] is None and result["image"] is None
        assert result["format"] == "JPEG"
        if subtype_head(engine.model) is None:  # a model without a head gives no estimate
            assert result["p_viral"] is None and result["subtype_estimate"] is None
    PredictResponse.model_validate(body)
    # The model separates these images well: most pneumonia above the threshold, normals below.
    decisions = [r["decision"] for r in results]
    assert decisions[:3].count("PNEUMONIA") >= 2 and decisions[3:].count("NORMAL") >= 2


def test_heatmap_and_image_come_as_base64_png(client: TestClient) -> None:
    xray = fixture_images("PNEUMONIA")[0]
    response = client.post("/v1/predict?heatmap=true&image=true", files=[upload(xray)])
    result = response.json()["results"][0]
    assert result["status"] == "ok"
    heatmap, image = decode_png(result["heatmap"]), decode_png(result["image"])
    assert image.size == Image.open(xray).size  # 224x224 originals are not resized
    # The overlay is a titled figure with a colour bar, so larger than the X-ray and in colour.
    assert heatmap.width > image.width and heatmap.mode in ("RGB", "RGBA")


def test_natural_images_are_rejected_with_a_reason(client: TestClient) -> None:
    photos = [upload_bytes("astronaut.png", natural_png("astronaut"))]
    photos.append(upload_bytes("camera.png", natural_png("camera")))  # greyscale photo
    response = client.post("/v1/predict?heatmap=true", files=photos)
    assert response.status_code == 200
    for result in response.json()["results"]:
        assert result["status"] == "rejected", result
        assert result["reason"] and result["probability"] is None and result["heatmap"] is None
    reasons = [r["reason"] for r in response.json()["results"]]
    assert "colour" in reasons[0] and "chest X-ray" in reasons[1]


def test_non_images_get_a_per_file_error_never_a_500(client: TestClient) -> None:
    good = fixture_images("NORMAL")[0]
    cut = good.read_bytes()[:2000]
    files = [
        upload_bytes("notes.txt", b"clinical notes, not an image\n"),
        upload(good),
        upload_bytes("empty.png", b""),
        upload_bytes("cut.jpeg", cut),
        upload_bytes("fake.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00garbage"),
    ]
    response = client.post("/v1/predict?heatmap=true&image=true", files=files)
    assert response.status_code == 200
    statuses = [(r["filename"], r["status"]) for r in response.json()["results"]]
    assert statuses == [
        ("notes.txt", "error"), (good.name, "ok"), ("empty.png", "error"),
        ("cut.jpeg", "error"), ("fake.dcm", "error"),
    ]  # fmt: skip
    reasons = {r["filename"]: r["reason"] for r in response.json()["results"]}
    assert reasons["notes.txt"] == "notes.txt: not an image (unrecognised format)"
    assert "empty" in reasons["empty.png"] and "cut.jpeg" in reasons["cut.jpeg"]
    assert "DICOM" in reasons["fake.dcm"]


def test_oversized_file_is_refused_with_413_naming_it(engine: Engine) -> None:
    app = create_app(engine=engine, max_upload_bytes=200_000, max_request_bytes=1_000_000)
    small = fixture_images("NORMAL")[0]
    with TestClient(app) as client:
        big = upload_bytes("big-scan.png", b"\x89PNG" + b"\0" * 200_001)
        response = client.post("/v1/predict", files=[upload(small), big])
        assert response.status_code == 413
        assert "big-scan.png" in response.json()["detail"]
        assert "larger than the 195 KB limit per file" in response.json()["detail"]
        # The whole request is capped too: many files each under the file cap.
        many = [upload_bytes(f"part{i}.png", b"\0" * 150_000) for i in range(8)]
        response = client.post("/v1/predict", files=many)
        assert response.status_code == 413 and "per request" in response.json()["detail"]
        # A file at the cap is fine (then answered per file).
        response = client.post("/v1/predict", files=[upload_bytes("x.bin", b"\0" * 200_000)])
        assert response.status_code == 200


def test_too_many_files_and_malformed_requests(engine: Engine) -> None:
    with TestClient(create_app(engine=engine, max_files=2)) as client:
        xray = fixture_images("NORMAL")[0]
        response = client.post("/v1/predict", files=[upload(xray)] * 3)
        assert response.status_code == 413 and "at most 2" in response.json()["detail"]
        response = client.post("/v1/predict", content=b"{}", headers={"content-type": "x/y"})
        assert response.status_code == 415
        response = client.post("/v1/predict", files=[("other", ("a.png", b"x", "image/png"))])
        assert response.status_code == 400 and "'files'" in response.json()["detail"]
        cut = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nab'
        headers = {"content-type": "multipart/form-data; boundary=b"}
        response = client.post("/v1/predict", content=cut, headers=headers)
        assert response.status_code == 400 and "incomplete" in response.json()["detail"]


def test_api_key_is_required_on_v1_when_set(engine: Engine) -> None:
    xray = fixture_images("NORMAL")[0]
    with TestClient(create_app(engine=engine, api_key=KEY)) as client:
        for headers in ({}, {API_KEY_HEADER: "wrong"}, {API_KEY_HEADER: KEY + " "}):
            response = client.post("/v1/predict", files=[upload(xray)], headers=headers)
            assert response.status_code == 401, headers
            assert API_KEY_HEADER in response.json()["detail"]
            assert client.get("/v1/model", headers=headers).status_code == 401
        good = {API_KEY_HEADER: KEY}
        response = client.post("/v1/predict", files=[upload(xray)], headers=good)
        assert response.status_code == 200 and response.json()["results"][0]["status"] == "ok"
        assert client.get("/v1/model", headers=good).status_code == 200
        # The page, its files, health and docs stay open: the page asks for the key itself.
        for path in ("/", "/static/app.js", "/health", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_uploads_never_touch_the_disk(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 MB PNG of a real X-ray: above the 1 MB at which Starlette's forms spool to disk.
    xray = Image.open(fixture_images("PNEUMONIA")[0]).convert("L").resize((1500, 1400))
    buffer = io.BytesIO()
    xray.save(buffer, format="PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) > 2 * 10**6
    import matplotlib.figure  # noqa: F401  (imported before the watch: its first import may cache)

    # A private temporary folder, so files other processes put in /tmp cannot confuse the check;
    # and any attempt to create a temporary file fails loudly.
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a temporary file was created while serving an upload")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    assert tempfile.gettempdir() == str(folder)
    response = client.post("/v1/predict?heatmap=true", files=[upload_bytes("big.png", data)])
    assert response.status_code == 200
    assert response.json()["results"][0]["status"] == "ok"
    assert list(folder.iterdir()) == []


def test_dicom_is_read_by_content_and_no_patient_data_is_logged(
    client: TestClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("pydicom")
    from pneumoscan.data.dicom import write_dicom

    pixels = np.asarray(Image.open(fixture_images("PNEUMONIA")[0]).convert("L"), np.uint16) * 16
    source = write_dicom(
        pixels,
        tmp_path / "study",
        bits_stored=12,
        window=(2048, 4096),
        # The birth date is malformed on purpose: pydicom's validation would quote it.
        extra={"PatientName": "DOE^JANE", "PatientID": "PID-7731942", "PatientBirthDate": "JANE"},
    )
    caplog.set_level(logging.DEBUG)
    files = [upload_bytes("JANE_DOE_PID-7731942", source.read_bytes())]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        response = client.post("/v1/predict?heatmap=true", files=files)
    result = response.json()["results"][0]
    assert result["status"] == "ok" and result["format"] == "DICOM", result
    logged = caplog.text + "".join(capfd.readouterr()) + " ".join(str(w.message) for w in warned)
    assert "predict: 1 files (1 ok" in caplog.text  # the service logs counts...
    for secret in ("DOE", "JANE", "7731942"):  # ...and no tag value or file name
        assert secret not in logged


def test_concurrent_requests_share_the_model_and_agree(client: TestClient, engine: Engine) -> None:
    files = real_xrays()
    alone = [
        client.post("/v1/predict", files=[upload(p)]).json()["results"][0]["probability"]
        for p in files
    ]

    async def together() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            requests = [http.post("/v1/predict", files=[upload(p)]) for p in files * 3]
            return await asyncio.gather(*requests)

    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses)
    batched = [r.json()["results"][0]["probability"] for r in responses]
    assert batched == pytest.approx(alone * 3, abs=1e-5)


def test_a_cancelled_request_does_not_stop_the_worker(engine: Engine) -> None:
    from pneumoscan.data.preprocess import decode_image

    images = [decode_image(p) for p in real_xrays()]
    busy = engine.submit(images * 6, heatmap=False)  # keeps the worker busy for a while
    deadline = time.monotonic() + 30
    while not busy.running() and not busy.done():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    gone = engine.submit(images[:1], heatmap=False)
    assert gone.cancel()  # the client disconnected while its job was queued
    after = engine.submit(images[:2], heatmap=True).result(timeout=60)
    assert [s.result.status for s in after] == ["ok", "ok"]
    assert all(s.heatmap is not None and s.heatmap.shape == (224, 224) for s in after)
    assert len(busy.result(timeout=60)) == len(images) * 6


def test_model_endpoint_gives_card_metadata_and_limits(client: TestClient, engine: Engine) -> None:
    body = client.get("/v1/model").json()
    assert body["name"] == engine.name and body["threshold"] == engine.model.threshold
    assert body["classes"] == ["NORMAL", "PNEUMONIA"] and body["input_size"] == [224, 224]
    # The default backend is predict's: the shipped int8 ONNX export, Keras for heatmaps only.
    assert body["heatmaps"] is True and body["backend"] == "onnx"
    # Issue 18, defect 5: the model's own SHA-256 and the pneumoscan version.
    from pneumoscan.inference.export import file_sha256

    assert body["model_sha256"] == file_sha256(engine.model.path) == engine.identity.model_sha256
    assert body["pneumoscan_version"] == engine.identity.pneumoscan_version
    assert "not a diagnosis" in body["intended_use"]
    assert body["model_card"]["validation"]["n"] == body["metadata"]["validation_metrics"]["n"]
    assert body["limits"] == {
        "max_upload_bytes": 20 * MB, "max_request_bytes": 100 * MB, "max_files": 50,
    }  # fmt: skip


def test_docs_and_page_load_nothing_from_outside(client: TestClient) -> None:
    external = re.compile(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert not external.search(docs.text), external.search(docs.text)
    for asset in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset
    page = client.get("/")
    assert page.status_code == 200 and "Triage support, not a diagnosis" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (WEB_DIR / name).read_text(encoding="utf-8")
        assert not external.search(text), (name, external.search(text))
        assert client.get(f"/static/{name}").status_code == 200


def test_openapi_documents_the_upload_and_the_key(engine: Engine) -> None:
    with TestClient(create_app(engine=engine, api_key=KEY)) as client:
        schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["type"] == "array"
    assert {"heatmap", "image"} <= {p["name"] for p in predict["parameters"]}
    assert {"/v1/model", "/health"} <= set(schema["paths"])
    schemes = schema["components"]["securitySchemes"]
    assert any(s.get("name") == API_KEY_HEADER for s in schemes.values())


def test_health_says_when_the_model_failed_to_load(tmp_path: Path) -> None:
    app = create_app(model_path=tmp_path / "missing.keras")
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while (body := client.get("/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").status_code == 503
        assert body["live"] is True and body["ready"] is False and body["status"] == "failed"
        assert "missing.keras" in body["detail"]
        files = [upload(fixture_images("NORMAL")[0])]
        assert client.post("/v1/predict", files=files).status_code == 503


def test_cli_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "nope.keras")])
    assert result.exit_code == 2 and "not found" in result.output
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"]).output
    assert "--api-key" in help_text and "PNEUMOSCAN_API_KEY" in help_text


def test_each_result_records_the_model_version_and_time(client: TestClient, engine: Engine) -> None:
    from datetime import datetime

    from pneumoscan import __version__
    from pneumoscan.inference.export import file_sha256

    good = fixture_images("NORMAL")[0]
    files = [upload(good), upload_bytes("notes.txt", b"not an image")]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["ok", "error"]
    for result in results:  # the file that scored it: the ONNX export on the auto backend
        assert result["model_sha256"] == file_sha256(engine.model.path)
        assert result["pneumoscan_version"] == __version__
        scored_at = datetime.fromisoformat(result["scored_at"])
        assert scored_at.utcoffset() is not None and scored_at.utcoffset().total_seconds() == 0


def test_page_shows_thresholds_with_enough_digits() -> None:
    """The page's JavaScript formats thresholds as format_threshold does (run in Node)."""
    import json
    import shutil
    import subprocess

    from pneumoscan.formatting import format_threshold

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (WEB_DIR / "app.js").read_text()
    start = script.index("  function thresholdDecimals")
    end = script.index("  function localError")
    values = [0.9996, 0.99996, 0.5, 0.787, 0.00004, 0.123456]
    code = script[start:end] + f"console.log(JSON.stringify({values}.map(formatThreshold)));"
    shown = json.loads(subprocess.run([node, "-e", code], capture_output=True, check=True,
                                      text=True, timeout=30).stdout)  # fmt: skip
    assert shown == [format_threshold(v) for v in values]
    assert shown[:2] == ["0.9996", "0.99996"] and "toFixed(3)" not in script.replace(
        "p.toFixed(threshold == null ? 3", ""
    )


def test_a_subtype_head_adds_its_estimate_to_pneumonia_results_only(
    subtype_client: TestClient, subtype_model: Path
) -> None:
    pneumonia, normal = fixture_images("PNEUMONIA")[:3], fixture_images("NORMAL")[:3]
    files = [upload(p) for p in [*pneumonia, *normal]]
    files += [upload_bytes("astronaut.png", natural_png("astronaut"))]
    files += [upload_bytes("notes.txt", b"not an image")]
    response = subtype_client.post("/v1/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    PredictResponse.model_validate(body)
    results = body["results"]
    assert [r["status"] for r in results[-2:]] == ["rejected", "error"]
    decisions = [r["decision"] for r in results[:-2]]
    assert "PNEUMONIA" in decisions[:3] and "NORMAL" in decisions[3:], decisions
    threshold = _scoring_subtype(subtype_model)["operating_point"]["threshold"]
    for result in results:
        if result["decision"] == "PNEUMONIA":
            assert 0.0 <= result["p_viral"] <= 1.0, result
            assert result["subtype_estimate"] in {BACTERIAL, VIRAL}
            # The call sits at the head's threshold on P(bacterial) = 1 - P(viral).
            bacterial = 1.0 - result["p_viral"] >= threshold
            assert result["subtype_estimate"] == (BACTERIAL if bacterial else VIRAL)
        else:  # NORMAL, rejected and unreadable files carry no estimate
            assert result["p_viral"] is None and result["subtype_estimate"] is None, result


def test_model_endpoint_says_whether_there_is_a_subtype_head(
    client: TestClient, engine: Engine, subtype_client: TestClient, subtype_model: Path
) -> None:
    body = subtype_client.get("/v1/model").json()
    head = _scoring_subtype(subtype_model)
    assert body["subtype_head"] is True
    assert body["subtype_threshold"] == head["operating_point"]["threshold"]
    shipped = client.get("/v1/model").json()
    has_head = subtype_head(engine.model) is not None
    assert shipped["subtype_head"] is has_head
    assert (shipped["subtype_threshold"] is None) is not has_head


def test_openapi_labels_the_subtype_as_an_estimate(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    result = schemas["FileResult"]["properties"]
    for field in ("p_viral", "subtype_estimate"):
        assert SUBTYPE_LABEL in result[field]["description"], field
    assert SUBTYPE_LABEL in schemas["ModelInfo"]["properties"]["subtype_head"]["description"]
    # The page shows the estimate with the same words.
    assert f'"{SUBTYPE_LABEL}"' in (WEB_DIR / "app.js").read_text(encoding="utf-8")
