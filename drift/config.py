"""Reading config.json fields: each checked for type and range, a ConfigError naming the
field otherwise (a string ``rope_theta``, ``num_key_value_heads: 0``, a negative layer count)."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def _cfg(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def _which(config: dict[str, Any], keys: tuple[str, ...]) -> str:
    return next((k for k in keys if config.get(k) is not None), keys[0])


def _int(config: dict[str, Any], *keys: str, default: int | None = None, minimum: int = 1,
         maximum: int = 1 << 40) -> int:
    """An integer config field (the first of ``keys`` present), in ``minimum`` .. ``maximum``
    (by default far past any real shape, not so far that a list of that many exhausts memory);
    a ConfigError names the field otherwise. ``default``: when none is present (None: required)."""
    v = _cfg(config, *keys)
    if v is None:
        if default is None:
            raise ConfigError(f"config.json lacks {' / '.join(keys)}")
        return default
    integral = isinstance(v, int) or isinstance(v, float) and math.isfinite(v) and v.is_integer()
    if isinstance(v, bool) or not integral or int(v) < minimum:
        raise ConfigError(f"config.json: {_which(config, keys)} must be an integer ≥ {minimum}, not {v!r}")
    if int(v) > maximum:
        raise ConfigError(f"config.json: {_which(config, keys)} is {v!r}, more than {maximum} (a damaged config?)")
    return int(v)


def _num(config: dict[str, Any], *keys: str, default: float, low: float = 0.0, high: float = float("inf"),
         low_open: bool = True) -> float:
    """A number config field in (low, high] (``low_open``) or [low, high]; a ConfigError names it otherwise."""
    v = _cfg(config, *keys)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high \
        and (v > low if low_open else v >= low)
    if not ok:
        rng = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"config.json: {_which(config, keys)} must be a number in {rng}, not {v!r}")
    return float(v)
