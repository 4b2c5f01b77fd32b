"""How a report writes its numbers: fixed digits, `—` for missing, `n/a` for a test that does not apply.

Shared by results.md (render.py, conclusions.py), the plots' titles (plots.py) and the headline
table of `testnet experiment report`.
"""

from __future__ import annotations

import math

from hetero_testnet.experiments.stats import MeanCI

NA = "—"


def fmt_ci(s: MeanCI, digits: int = 4) -> str:
    if s.n == 0 or s.mean is None:
        return NA
    if not math.isfinite(s.mean):
        return f"NaN (n={s.n})"
    if s.half_width is None:
        return f"{s.mean:.{digits}f} (n=1, no CI)"
    return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"


def fmt(v: float | None, digits: int = 4, signed: bool = False) -> str:
    if v is None:
        return NA
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else str(v)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def tier_name(t: int, kind: str) -> str:
    """`kind` val: the (sub)model validated; train: the clients that trained at that tier."""
    if kind == "val":
        return "tier 0 (full model)" if t == 0 else f"tier {t} submodel (FFN 1/{2 ** t})"
    return f"tier {t} clients"


def md_table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table's lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
