"""The figure set-up shared by the report's modules (re-exported from `refusal_ray.core.render`, where
the stages' read modules take it too): matplotlib on the Agg backend (no display), `plt`, and
`png(fig)`, a finished figure as PNG bytes (110 dpi, tight layout; the figure is closed).
"""

from __future__ import annotations

from refusal_ray.core.render import plt, png

__all__ = ["plt", "png", "_png"]

_png = png   # report.py's name
