"""The figure set-up shared by the report's modules: matplotlib on the Agg backend (no display),
`plt`, and `png(fig)`, a finished figure as PNG bytes (110 dpi, tight layout; the figure is closed).

Below `report.py` and the per-stage figure modules (`report_select.py`, `report_circuits.py`), which
import it, so none of them imports another's module: no circle.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "png", "_png"]


def png(fig) -> bytes:
    """`fig` as PNG bytes (tight layout, 110 dpi); closes the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


_png = png   # report.py's name
