"""Comparison methods: how a layer becomes a form, and how two forms are compared.

A :class:`Method` makes a layer's :class:`~drift.methods.form.Form` (its representative under
the method), the null's unrelated partner of a form, and a :class:`Comparison` of two forms.
A comparison is three declared steps, so that a scheduler can place the expensive one:

- ``assignment``: the one large assignment problem (a similarity to *maximise*, rows = B's
  units), or ``None``. The scheduler solves it where it likes (see :mod:`drift.schedule`).
- ``prepare()``: the work that does not need the answer, done while it is being solved.
- ``finish(answer)``: the per-family residuals.

A method also *fits*: ``Method.fit(layer_a, layer_b)`` returns the alignment it found, an
object whose ``apply(layer_a)`` is layer A moved into layer B's coordinates and whose
``function_preserving`` says whether that keeps A's function (``exact``: yes, it is a group
element, :mod:`.fit`; ``rotation``: no, :class:`.rotation.RotationAlignment`; ``raw``: the
identity).

:func:`run` does the three in this thread. Methods: ``exact`` (:mod:`.exact`), ``rotation``
and ``raw`` (:mod:`.rotation`); :data:`METHODS` is the registry every other module reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..assign import lap
from ..errors import DriftError
from .exact import ExactComparison, exact_compare, exact_form
from .fit import ExactAlignment, fit as exact_fit
from .form import Form
from .rotation import RotationAlignment, RotationComparison, fit_rotation, rotation_compare, rotation_form

__all__ = ["METHODS", "Comparison", "ExactAlignment", "Form", "Method", "RotationAlignment", "exact_compare",
           "exact_fit", "exact_form", "fit_rotation", "get", "run", "rotation_compare", "rotation_form"]


class Comparison(Protocol):
    assignment: Any  # a BlockCost to maximise, or None

    def prepare(self) -> None: ...

    def finish(self, answer: Any) -> dict[str, float]: ...


def run(c: Comparison) -> dict[str, float]:
    """The comparison's steps in this thread."""
    answer = None if c.assignment is None else lap(c.assignment, maximize=True)
    c.prepare()
    return c.finish(answer)


@dataclass(frozen=True)
class Method:
    name: str
    about: str  # one line, for the CLI's help and the explorer's tooltips
    title: str  # how figure titles name it
    approximate: bool  # the fitted alignment is not a symmetry of the model
    make_form: Callable[..., Form]
    make_comparison: Callable[[Form, Form], Comparison]
    make_fit: Callable[..., Any]  # (layer_a, layer_b) -> an alignment with .apply(layer_a)
    lazy_null: bool = False  # the null partner's MLP is rotated as the comparison reads it
    assigns: bool = False  # its comparisons have a large assignment (worth worker processes)

    def form(self, layer, consume: bool = False) -> Form:
        """The layer's form; ``consume=True`` lets the method release the layer's tensors as it goes."""
        return self.make_form(layer, consume=consume)

    def null_partner(self, f: Form, R: torch.Tensor, gen: torch.Generator) -> Form:
        """``f`` with its residual stream rotated by ``R`` and its gain entries shuffled."""
        return f.rotate_residual(R, lazy_mlp=self.lazy_null).shuffle_gains(gen)

    def compare(self, fa: Form, fb: Form) -> Comparison:
        return self.make_comparison(fa, fb)

    def fit(self, layer_a, layer_b):
        """The alignment of layer A onto layer B this method fits (float64); its
        ``apply(layer_a)`` is A in B's coordinates, ``function_preserving`` says whether
        that computes what A computes."""
        return self.make_fit(layer_a, layer_b)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("exact", "remove exactly the model's symmetry group (default)", "exact gauge", False,
           exact_form, ExactComparison, exact_fit, lazy_null=True, assigns=True),
    Method("rotation", "the reference script's per-head O(d_head) + O(d_ff) rotations, orientation "
           "corrected (approximate: not a symmetry)", "rotation (approximate)", True,
           lambda layer, consume=False: rotation_form(layer), lambda a, b: RotationComparison(a, b, fit=True),
           fit_rotation),
    Method("raw", "no alignment", "raw (no alignment)", True,
           lambda layer, consume=False: rotation_form(layer), lambda a, b: RotationComparison(a, b, fit=False),
           lambda a, b: fit_rotation(a, b, fit=False)),
)}
"""The registry: method name -> :class:`Method`, in the order users see them."""


def get(name: str) -> Method:
    """The method called ``name``, or a DriftError listing the methods."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise DriftError(f"method must be one of {', '.join(METHODS)}, not {name!r}") from None
