"""Shared fixtures: real X-rays from the repo's fixture set and, when present, ../shared/data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "xrays"
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_TRAIN = SHARED_DATA / "chest_xray" / "train"
SITE_SAMPLE = SHARED_DATA / "site_sample"
ORIGINALS = SHARED_DATA / "originals"
# Debian's Chromium, driven by Playwright for the browser tests (no browser download); the
# background-networking flags keep it from calling out of this offline machine.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

needs_shared = pytest.mark.skipif(
    not SHARED_TRAIN.is_dir(),
    reason=f"needs the shared data set at {SHARED_DATA} (CI always has it)",
)


#: The decoded-image cache the user has outside the tests (``~/.cache/pneumoscan``).
USER_CACHE = Path.home() / ".cache" / "pneumoscan"
_PRIVATE_CACHE = Path(tempfile.mkdtemp(prefix="pneumoscan-test-cache-"))
_PREVIOUS_CACHE = os.environ.get("PNEUMOSCAN_CACHE")


def pytest_configure(config: pytest.Config) -> None:
    """Keep the tests' decoded-image cache out of the user's ~/.cache from the very start:
    before collection, for every fixture and every subprocess a test starts (a session
    fixture came too late for code that runs while test modules are imported)."""
    os.environ["PNEUMOSCAN_CACHE"] = str(_PRIVATE_CACHE)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PREVIOUS_CACHE is None:
        os.environ.pop("PNEUMOSCAN_CACHE", None)
    else:
        os.environ["PNEUMOSCAN_CACHE"] = _PREVIOUS_CACHE
    shutil.rmtree(_PRIVATE_CACHE, ignore_errors=True)


def fixture_images(label: str) -> list[Path]:
    """Real X-rays of one class from the repo's fixture set, sorted."""
    return sorted((FIXTURES / label).glob("*.jpeg"))


@pytest.fixture
def xray_path() -> Path:
    """One real NORMAL X-ray."""
    return fixture_images("NORMAL")[0]


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A writable copy of the fixture set: ROOT/NORMAL, ROOT/PNEUMONIA."""
    root = tmp_path / "xrays"
    shutil.copytree(FIXTURES, root)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (short) training run shared by the tests that need a trained model."""
    from pneumoscan.train.loop import TrainOptions, train

    out = tmp_path_factory.mktemp("runs") / "seed-1epoch"
    data = SHARED_TRAIN.parent if SHARED_TRAIN.is_dir() else FIXTURES
    max_images = 300 if SHARED_TRAIN.is_dir() else None
    train(
        TrainOptions(
            data=str(data), out=str(out), epochs=1, max_images=max_images, val_fraction=0.2
        )
    )
    return out


@pytest.fixture(scope="session")
def subtype_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.keras`` model with a bacterial-or-viral head: the shipped model when it carries
    one, else a copy of it given a small seeded head (for tests of where the estimate goes,
    not of how good it is)."""
    import numpy as np

    from pneumoscan.constants import DEFAULT_MODEL_PATH
    from pneumoscan.models.modelfile import OperatingPoint, read_metadata, write_metadata
    from pneumoscan.models.subtype import SubtypeHead

    metadata = read_metadata(DEFAULT_MODEL_PATH)
    if "subtype" in metadata:
        return Path(DEFAULT_MODEL_PATH)
    out = tmp_path_factory.mktemp("subtype") / "with-subtype.keras"
    shutil.copyfile(DEFAULT_MODEL_PATH, out)
    weights = np.random.default_rng(0).normal(0.0, 0.05, size=1280)
    point = OperatingPoint(threshold=0.5, fitted_on="validation split")
    head = SubtypeHead(weights, 0.0, point, {}, {})
    write_metadata(out, metadata | {"subtype": head.to_metadata()})
    return out
