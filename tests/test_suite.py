"""The test suite itself: it leaves the user's files alone (issue 18, defect 8)."""

from __future__ import annotations

import os
import subprocess
import sys

from pneumoscan.data.cache import cache_root

from conftest import USER_CACHE


def test_the_suite_keeps_the_decoded_image_cache_out_of_home() -> None:
    root = cache_root()
    assert not root.resolve().is_relative_to(USER_CACHE.resolve())
    # Subprocesses a test starts (the CLI, benchmarks) inherit the private cache too.
    code = "from pneumoscan.data.cache import cache_root; print(cache_root())"
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert shown == str(root) == os.environ["PNEUMOSCAN_CACHE"]
