"""pneumoscan: pneumonia triage on pediatric frontal chest X-rays.

The Python API (:mod:`pneumoscan.api`)::

    import pneumoscan
    model = pneumoscan.load()                     # shipped model, on its int8 ONNX export
    print(model.predict(pneumoscan.samples()))    # one row per file, as `pneumoscan predict`

``import pneumoscan`` stays cheap: the API is imported on first use of one of its names, and
TensorFlow only when a Keras network is needed (``backend="keras"``, ``Model.heatmap``).
"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING, Any

# TensorFlow's C++ start-up lines (oneDNN custom operations, CPU features, cuda and absl
# notices) drown pneumoscan's own output. The log level is read from the environment when
# TensorFlow loads, so it is set before any import of it (every pneumoscan import runs this
# first; a value the user set is kept); the lines TensorFlow 2.21 writes before reading it
# are filtered by an import hook (pneumoscan._quiet_tf).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# ONNX Runtime records telemetry (process, OS and host details) into
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ as soon as it is imported; in a hospital
# nothing may leave or be kept about the host unasked. Read when it loads, so set here
# (issue 22; the sessions also call onnxruntime.disable_telemetry_events()).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from pneumoscan import _quiet_tf  # standard library only: TensorFlow stays unloaded

_quiet_tf.install()

from pneumoscan.constants import VERSION as __version__  # noqa: E402  (after the log filter)

__all__ = ["Model", "__version__", "evaluate", "load", "samples"]

#: Names served lazily from pneumoscan.api.
_API = frozenset({"Model", "evaluate", "load", "samples"})

if TYPE_CHECKING:
    from pneumoscan.api import Model, evaluate, load, samples


def __getattr__(name: str) -> Any:
    if name in _API:
        from pneumoscan import api  # lazy: loads pandas

        return getattr(api, name)
    raise AttributeError(f"module 'pneumoscan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """The package module, keeping ``pneumoscan.evaluate`` the API function.

    Importing a submodule sets it as an attribute of its package, and the submodule
    ``pneumoscan.evaluate`` shares its name with the function: without this, the first
    ``from pneumoscan.evaluate import ...`` anywhere would turn ``pneumoscan.evaluate(...)``
    into "module is not callable". The submodule stays importable by its full name.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
