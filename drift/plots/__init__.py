"""Figures of an :class:`~drift.result.AnalysisResult`.

Results are data, plots are views: every function here takes a finished result (or a dict
of results), draws on ``ax`` (a new figure when ``ax`` is None) and returns what it drew on.
Nothing is recomputed. Every title names the alignment method, because a residual only
means something next to the method's own null (gauge-spec §5)::

    ρ = residual / null     ~0: identical up to the removed gauge
                            ~1: as different as an unrelated partner

``heatmap``          layer x layer matrix of one family; of a cross-model result, layers
                     of the model x layers of the other, axes named after them (.heatmaps)
``heatmap_grid``     small multiples of ``heatmap``, one shared colour scale (activation
                     measures, a distance and a similarity: one each)         (.heatmaps)
``drift_along``      consecutive pairs along the depth: ρ (with the ρ = 1 null line), or
                     residual and null side by side (``value="residual"``)   (.depth)
``diagonal_along``   the same for a cross-model result's diagonal: layer L of the model
                     against layer L of the other                            (.depth)
``ranking``          mean ρ per family with min/max whiskers, least to most variation
                     (a similarity, update_cka, as 1 − similarity)
``compare_methods``  one bar per method and family; with ``value="residual"`` each bar
                     carries its own null, so an over-fitting method shows a low null (.ranking)
``weight_vs_tie``    weight ρ against the tie test's damage per (family, pair), with
                     rank correlations (.function; the numbers: ``weight_tie_correlations``)
``save``, ``export_csv``                                                     (.output)

matplotlib is imported inside the functions, so ``import drift.plots`` stays cheap and
``import drift`` never imports it.
"""

from __future__ import annotations

from ._common import KIND_COLORS, METHOD_COLORS, METHOD_NAMES, SAVE_FORMATS, VALUE_LABELS, VALUE_SHORT
from .depth import diagonal_along, drift_along
from .function import weight_tie_correlations, weight_vs_tie
from .heatmaps import heatmap, heatmap_grid
from .output import export_csv, save
from .ranking import compare_methods, ranking

__all__ = ["KIND_COLORS", "METHOD_COLORS", "METHOD_NAMES", "SAVE_FORMATS", "VALUE_LABELS", "VALUE_SHORT",
           "compare_methods", "diagonal_along", "drift_along", "export_csv", "heatmap", "heatmap_grid",
           "ranking", "save", "weight_tie_correlations", "weight_vs_tie"]
