"""The result of an analysis: a tidy table plus the metadata that says what the numbers are.

Every row is one (family, layer pair)::

    family     canonical family name (``q_proj`` ... ``down_proj``, ``input_ln`` ..., ``qk_circuit``)
    layer_a, layer_b
               (cross-model, ``meta["other"]`` set: layer_a of the model, layer_b of the other)
    residual   Frobenius distance after alignment, both sides normalised to unit norm
               (0 = identical up to the removed gauge; sqrt(2) = orthogonal, nothing fitted)
    null       the same method's residual against a structure-preserving unrelated partner
               (layer_b with its residual stream randomly rotated; gauge-spec §5)
    rho        residual / null: ~0 identical up to gauge, ~1 as different as unrelated weights
    invariant  True when the family's number is invariant under the model's exact symmetries
               (False for raw norm-gain vectors and for every family under ``rotation``)
    kind       "weight" | "circuit" | "norm" | "activation"
    space      "weights" (every :func:`drift.analyze` row; the default when a table lacks the
               column) | "activations" (:func:`drift.function.activation_similarity`)

Results are data; :mod:`drift.plots` only draws them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DriftError

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["family", "layer_a", "layer_b", "residual", "null", "rho", "invariant", "kind"]

OPTIONAL_COLUMNS = {"space": "weights"}
"""Columns a table may lack, and the value they then take in every row."""


@dataclass
class AnalysisResult:
    """A tidy DataFrame of per-family, per-pair drift and the run's metadata."""

    df: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.df.columns]
        if missing:
            raise ValueError(f"result table lacks columns {missing}")
        absent = {c: v for c, v in OPTIONAL_COLUMNS.items() if c not in self.df.columns}
        if absent:
            self.df = self.df.assign(**absent)

    # ------------------------------------------------------------------ views
    @property
    def method(self) -> str:
        return self.meta.get("method", "?")

    @property
    def families(self) -> list[str]:
        """Families in first-seen order."""
        return list(dict.fromkeys(self.df["family"]))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Layer pairs in analysis order."""
        p = self.df[["layer_a", "layer_b"]].drop_duplicates()
        return [(int(a), int(b)) for a, b in p.itertuples(index=False)]

    @property
    def cross_model(self) -> bool:
        """Does the table compare layers of two models (``analyze(model, other=...)``)?"""
        return bool(self.meta.get("other"))

    def diagonal(self) -> "AnalysisResult":
        """Only the rows with layer_a == layer_b (of a cross-model result: layer L of both models)."""
        df = self.df[self.df["layer_b"] == self.df["layer_a"]].reset_index(drop=True)
        return AnalysisResult(df, {**self.meta, "pairs": "diagonal"})

    def consecutive(self) -> "AnalysisResult":
        """Only the rows with layer_b == layer_a + 1."""
        df = self.df[self.df["layer_b"] == self.df["layer_a"] + 1].reset_index(drop=True)
        return AnalysisResult(df, {**self.meta, "pairs": "consecutive"})

    @property
    def value_columns(self) -> list[str]:
        """The table's number columns that :meth:`summary` and :meth:`matrix` take:
        ``residual``, ``null``, ``rho`` and any a result adds (a tie's ``embedding_cos`` …)."""
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        keys = {"layer_a", "layer_b"}
        return [c for c in self._column_order()
                if c not in keys and is_numeric_dtype(self.df[c]) and not is_bool_dtype(self.df[c])]

    def _check_value(self, name: str, value) -> None:
        if not isinstance(value, str) or value not in self.value_columns:
            raise DriftError(f"{name} must be one of {', '.join(self.value_columns)}, not {value!r}")

    def summary(self, by: str = "residual") -> pd.DataFrame:
        """Per-family mean/min/max/std/n of ``by`` (and mean null, mean rho), ranked by mean
        ``by``, least to most variation (the reference script's table).

        Raises:
            DriftError: ``by`` is not one of :attr:`value_columns`.
        """
        self._check_value("by", by)
        g = self.df.groupby("family", sort=False)
        out = g[by].agg(["mean", "min", "max", "std", "count"]).rename(columns={"count": "n"})
        out["std"] = g[by].agg(lambda v: float(np.std(v)))  # population std, as the reference
        out["null_mean"] = g["null"].mean()
        out["rho_mean"] = g["rho"].mean()
        out["invariant"] = g["invariant"].all()
        return out.sort_values("mean")

    def matrix(self, family: str, value: str = "rho") -> pd.DataFrame:
        """Layer x layer table of ``value`` for one family (symmetric; NaN where not computed).

        Of a cross-model result: layers of the model (rows) x layers of the other model
        (columns), as computed: not symmetric, and the diagonal is measured, not 0.

        Raises:
            DriftError: ``family`` is not in the result, or ``value`` is not one of :attr:`value_columns`.
        """
        self._check_value("value", value)
        if family not in self.families:
            raise DriftError(f"family {family!r} is not in the result (it has {', '.join(self.families)})")
        d = self.df[self.df["family"] == family]
        layers = sorted(set(d["layer_a"]) | set(d["layer_b"]))
        import pandas as pd

        if self.cross_model:
            m = pd.DataFrame(np.nan, index=sorted(set(d["layer_a"])), columns=sorted(set(d["layer_b"])))
            for a, b, v in d[["layer_a", "layer_b", value]].itertuples(index=False):
                m.loc[a, b] = v
            return m
        m = pd.DataFrame(np.nan, index=layers, columns=layers)
        for a, b, v in d[["layer_a", "layer_b", value]].itertuples(index=False):
            m.loc[a, b] = v
            m.loc[b, a] = v
        for L in layers:
            m.loc[L, L] = 0.0
        return m

    # ------------------------------------------------------------------ JSON
    def to_json_dict(self) -> dict[str, Any]:
        """The reference script's keys (``model``, ``block_start``, ``block_end``,
        ``family_residuals``: family -> list over pairs in pair order) plus ``null_residuals``,
        ``normalized`` (rho, same layout), ``pairs_list``, ``rows`` and the metadata."""
        fams = self.families
        pairs = self.pairs

        import pandas as pd

        def layout(col: str) -> dict[str, list[float | None]]:
            out = {}
            for fam in fams:
                d = self.df[self.df["family"] == fam].set_index(["layer_a", "layer_b"])[col]
                out[fam] = [None if (p not in d.index or pd.isna(d[p])) else float(d[p]) for p in pairs]
            return out

        layers = self.meta.get("layers") or sorted({x for p in pairs for x in p})
        return {
            "model": self.meta.get("model"),
            "block_start": int(min(layers)) if layers else None,
            "block_end": int(max(layers)) if layers else None,
            "family_residuals": layout("residual"),
            "null_residuals": layout("null"),
            "normalized": layout("rho"),
            "pairs_list": [list(p) for p in pairs],
            "invariant": {f: bool(self.df[self.df["family"] == f]["invariant"].all()) for f in fams},
            "rows": self._rows(),
            **{k: v for k, v in self.meta.items() if k not in ("model",)},
        }

    def _rows(self) -> list[dict[str, Any]]:
        """The table as JSON records, every float exact (Python's shortest repr; pandas'
        ``to_json`` keeps 10 decimal places, so 5e-14 became 0), NaN as null."""
        def py(v: Any) -> Any:
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            if isinstance(v, (float, np.floating)):
                return None if np.isnan(v) else float(v)
            return v

        return [{k: py(v) for k, v in r.items()} for r in self.df[self._column_order()].to_dict(orient="records")]

    def _column_order(self) -> list[str]:
        """The table's columns as stored: the fixed ones, then any others a result carries
        (``space``, a tie's ``embedding_cos`` …), none dropped."""
        return COLUMNS + [c for c in self.df.columns if c not in COLUMNS]

    def to_json(self, path: str | Path, force: bool = False) -> Path:
        """Write the result as JSON (:meth:`to_json_dict`), atomically. Refused (an
        :class:`~drift.output.OutputError`) as ``drift analyze --out`` is: a folder, a device
        or pipe, and unless ``force=True``, an existing file that is not a drift result or a
        path inside a model's folder."""
        from .output import check_result_output, write_atomic

        p = check_result_output(path, self.meta, force, "to_json:")
        return write_atomic(p, json.dumps(self.to_json_dict(), indent=2))

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "AnalysisResult":
        import pandas as pd

        seen = list(dict.fromkeys(c for r in d["rows"] for c in r))  # every column a row has
        df = pd.DataFrame.from_records(d["rows"], columns=COLUMNS + [c for c in seen if c not in COLUMNS])
        for c in df.columns:  # a number column that is all null (no null computed) is float NaN, not object
            vals = [v for v in df[c] if v is not None]
            if df[c].dtype == object and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                df[c] = df[c].astype(float)
        skip = {"family_residuals", "null_residuals", "normalized", "pairs_list", "invariant", "rows",
                "block_start", "block_end"}
        meta = {k: v for k, v in d.items() if k not in skip}
        return cls(df, meta)

    @classmethod
    def from_json(cls, path: str | Path) -> "AnalysisResult":
        """A result :meth:`to_json` wrote. Anything else (another JSON file, not JSON, not
        UTF-8, unreadable) is a :class:`~drift.errors.DriftError` naming the file."""
        from .errors import DriftError

        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise DriftError(f"{path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DriftError(f"{path}: not a drift result (not JSON: {e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
            raise DriftError(f"{path}: not a drift result (no table rows; one that to_json wrote?)")
        try:
            return cls.from_json_dict(d)
        except Exception as e:  # noqa: BLE001 - a damaged file, whatever the damage
            raise DriftError(f"{path}: not a readable drift result ({type(e).__name__}: {e})") from None
