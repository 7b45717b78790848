# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Plots of retrieval results for the HTML reports, drawn with matplotlib's Agg backend (no display needed) and
inlined as SVG."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

_RECALL = re.compile(r"^recall_at(\d+)$")


def recall_curves(metrics: Mapping[str, float]) -> dict[int, float]:
    """``{K: Recall@K}`` of the ``recall_at{K}`` entries of a flat metrics mapping, sorted by K."""
    curve = {}
    for key, value in metrics.items():
        match = _RECALL.match(key)
        if match and isinstance(value, (int, float)):
            curve[int(match.group(1))] = float(value)
    return dict(sorted(curve.items()))


def recall_at_k_svg(curves: Mapping[str, Mapping[int, float]], title: str = "Recall@K", percent: bool = False) -> str:
    """An inline ``<svg>`` of Recall@K against K (log scale), one line per entry of ``curves``; ``""`` when no
    curve has two points."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # a report is written on machines without a display
    from matplotlib.figure import Figure

    drawable = {name: curve for name, curve in curves.items() if len(curve) >= 2}
    if not drawable:
        return ""
    figure = Figure(figsize=(5.5, 3.4))
    axes = figure.add_subplot()
    for name, curve in drawable.items():
        ks = sorted(curve)
        axes.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    axes.set_xscale("log")
    all_ks = sorted({k for curve in drawable.values() for k in curve})
    axes.set_xticks(all_ks, [str(k) for k in all_ks])
    axes.minorticks_off()
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K" + (" (%)" if percent else ""))
    top = max(value for curve in drawable.values() for value in curve.values())
    full = 100 if percent else 1
    axes.set_ylim(0, full if top > 0.3 * full else max(top * 1.15, full / 100))  # low curves stay readable
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG is inlined in HTML
