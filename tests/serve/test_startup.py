"""The service's start-up log names the backend it scores on (issue 22)."""

from __future__ import annotations

import logging

import pytest

from pneumoscan.serve.app import ServiceState, _load_in_background
from pneumoscan.serve.uploads import UploadLimits


def test_the_start_up_log_names_the_backend_in_use(caplog: pytest.LogCaptureFixture) -> None:
    state = ServiceState(limits=UploadLimits(), api_key=None)
    with caplog.at_level(logging.INFO, logger="pneumoscan.serve"):
        _load_in_background(state, None, "auto").join(timeout=300)
    assert state.engine is not None, state.error
    try:
        (line,) = [r.getMessage() for r in caplog.records if "ready on" in r.getMessage()]
        # It said "ready on auto": the option, not what auto chose.
        assert f"ready on {state.engine.backend} in" in line
        assert state.engine.backend in ("onnx", "keras")
    finally:
        state.engine.close()
