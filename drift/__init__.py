"""drift: how much do a transformer's layers differ in weight space, once its gauge
symmetries are removed?

``import drift`` is cheap: it does not import matplotlib, ipywidgets or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (CheckpointError, DriftError, LayerIndexError, MissingTensorError,
                     ConfigError, ModelMismatchError, ModelNotFoundError, UnsupportedArchitectureError)
from .checkpoint import Checkpoint, resolve_model
from .canonical import CanonicalLayer, LayerReader, LayerSymmetry, open_layers
from .result import AnalysisResult
from .cache import code_digest as _code_digest

_code_digest()  # the numerical sources as imported: the cache's code key (drift.cache)

__all__ = [
    "__version__", "DriftError", "CheckpointError", "LayerIndexError", "MissingTensorError",
    "ConfigError", "ModelMismatchError", "ModelNotFoundError", "UnsupportedArchitectureError",
    "Checkpoint", "resolve_model",
    "CanonicalLayer", "LayerReader", "LayerSymmetry", "open_layers", "AnalysisResult",
    "analyze",
]


def analyze(*args, **kwargs):
    """See :func:`drift.analysis.analyze`."""
    from .analysis import analyze as _analyze

    return _analyze(*args, **kwargs)
