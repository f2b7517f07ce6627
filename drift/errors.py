"""Exception types. Every failure that a user can cause raises a :class:`DriftError`.

The CLI prints ``drift: <message>`` and exits with status 2 for these; anything else is a bug.
"""


class DriftError(Exception):
    """Base class: a problem with the user's input, stated in one line."""


class ModelNotFoundError(DriftError):
    """The model path, cache entry or bundled name cannot be resolved to a checkpoint."""


class CheckpointError(DriftError):
    """The checkpoint is unreadable: no weights, a corrupt file, a malformed config."""


class ConfigError(CheckpointError):
    """A config.json field of the wrong type or out of range (the message names the field)."""


class MissingTensorError(CheckpointError):
    """A tensor that the architecture requires is not in the checkpoint."""


class UnsupportedArchitectureError(DriftError):
    """The architecture, or a config field that changes the math, is not understood."""


class LayerIndexError(DriftError, IndexError):
    """A layer index outside ``[0, n_layers)``."""


class ModelMismatchError(DriftError):
    """Two models that cannot be compared layer by layer: a different architecture, or a
    field that decides a layer's shapes or gauge group (the message names it)."""


class PlotArgumentError(DriftError, ValueError):
    """A plot asked of a result that cannot give it (a value it has no null for, families it
    lacks, a file suffix no backend writes): a ValueError too, as plotting libraries raise."""


class ExplorerArgumentError(DriftError, ValueError):
    """An explorer setting that cannot be shown (an unknown method, pairs, value or space, a
    block outside the model): one line, and still a ValueError."""
