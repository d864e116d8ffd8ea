"""Keep TensorFlow's start-up lines off the terminal, whoever imports TensorFlow.

``TF_CPP_MIN_LOG_LEVEL`` silences TensorFlow's C++ log once it runs, but TensorFlow 2.21
writes its first lines (``oneDNN custom operations are on``, ``All log messages before
absl::InitializeLog() ...``, CPU-feature and CUDA notices) straight to file descriptor 2 while
it loads, before that setting is read. :func:`install` adds an import hook that, the one time
``tensorflow`` loads, catches what the loading writes to descriptor 2 and writes back every line
except those known start-up notices. Only the standard library is imported here:
``import pneumoscan`` stays cheap and does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence

#: Pieces of the start-up lines that are dropped (anything else is written back).
NOISE = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog() is called",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
)


def keep(line: str) -> bool:
    """Whether a line TensorFlow wrote while loading is more than a start-up notice."""
    return not any(piece in line for piece in NOISE)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Catch what is written to descriptor 2 and write back the lines :func:`keep` keeps."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if keep(line))
            if kept:
                os.write(2, kept.encode("utf-8"))


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with filtered_stderr():
            self._loader.exec_module(module)


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``tensorflow`` module, once."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _TensorFlowFinder()


def install() -> None:
    """Filter TensorFlow's start-up lines when it loads, unless it is loaded already or
    ``TF_CPP_MIN_LOG_LEVEL`` is 0 (the user asked for TensorFlow's log)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "") in ("", "0"):
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the import hook."""
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)
