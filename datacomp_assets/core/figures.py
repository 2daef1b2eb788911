"""Loss curves as a small PNG, and as markdown that Dagster's UI shows inline."""

from __future__ import annotations

import base64
import io


def loss_curve_png(curves: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """One line per run (e.g. per seed): contrastive loss against samples seen."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker processes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    for label, points in curves.items():
        if points:
            seen, loss = zip(*points)
            ax.plot(seen, loss, label=label, linewidth=1.2)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """An inline image (a data URI), the way Dagster's docs embed plots in markdown metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
