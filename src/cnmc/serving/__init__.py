"""The server: the logged pyfunc, batch prediction, the HTTP app and its guard.

``cnmc.serving.LeukemiaClassifier`` and ``cnmc.serving.EnsembleClassifier`` are the class paths that
models logged before the package layout (when this was one module) pickled: they stay importable
here so that those registered models still load and serve. The classes live in :mod:`cnmc.serving.pyfunc`.
"""

from typing import Any

_LOGGED_CLASSES = ("LeukemiaClassifier", "EnsembleClassifier")


def __getattr__(name: str) -> Any:
    """Import the pyfunc (torch, MLflow) only when an unpickled model asks for its class."""
    if name in _LOGGED_CLASSES:
        from cnmc.serving import pyfunc

        return getattr(pyfunc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
