"""Scaling analysis as the paper does it: subset size against average score per strategy family (its
Figure 2), and how well a ranking of strategies at one scale predicts the ranking at another (its Figure 3,
Spearman's rank correlation), across this project's measured scales and the paper's published numbers."""

from __future__ import annotations

import io
import itertools

# Reference section 6: ImageNet zero-shot top-1 (%) of the paper's baselines, per scale ("-" left out).
PAPER_IMAGENET = {
    "small": {"no_filter": 2.5, "basic": 3.0, "text_based": 4.6, "image_based": 4.3, "laion2b": 3.1,
              "clip_score_l14_30pct": 5.1, "image_based_clip_score_l14_30pct": 3.9},
    "medium": {"no_filter": 17.6, "basic": 22.6, "text_based": 25.5, "image_based": 26.8, "laion2b": 23.0,
               "clip_score_l14_30pct": 27.3, "image_based_clip_score_l14_30pct": 29.7,
               # the methods of the public medium filtering leaderboard (leaderboard-methods.md)
               "hype_dfn": 38.2, "hype_30pct": 34.6, "dfn_30pct": 37.1, "devil_in_the_details": 32.0,
               "tmars_50pct": 33.0, "density_pruning": 33.4, "sieve_clip_score_l14_20pct": 30.3},
    "large": {"no_filter": 45.9, "basic": 51.6, "text_based": 56.1, "image_based": 57.2, "laion2b": 55.3,
              "clip_score_l14_30pct": 57.8, "image_based_clip_score_l14_30pct": 63.1},
    "xlarge": {"no_filter": 72.3, "laion2b": 75.5, "clip_score_l14_30pct": 76.4,
               "image_based_clip_score_l14_30pct": 79.2},
}
IMAGENET_GROUP = "ImageNet"


def family(strategy: str) -> str:
    """The strategy family a point belongs to in Figure 2 (no filtering is the 100% random subset)."""
    if strategy == "no_filter" or strategy.startswith("random_"):
        return "random subset"
    if "recaptioned" in strategy:
        return "recaptioning"
    for prefix, name in (("clip_score_", "CLIP score"), ("image_based", "image-based"), ("text_based", "text-based"),
                         ("semdedup", "SemDeDup"), ("vas", "VAS"), ("dfn", "DFN"), ("metaclip", "MetaCLIP"),
                         ("hype", "HYPE"), ("devil", "Devil"), ("tmars", "T-MARS"), ("negclip", "negCLIPLoss"),
                         ("sieve", "SIEVE"),
                         ("density_pruning", "density pruning")):
        if strategy.startswith(prefix):
            return name
    return strategy


def imagenet_scores(rows: list[dict]) -> dict[str, float]:
    """Each filtering-track strategy's ImageNet score on a measured board (its ImageNet-group mean)."""
    return {r["strategy"]: r["groups"][IMAGENET_GROUP] for r in rows
            if r["track"] == "filtering" and IMAGENET_GROUP in r["groups"]}


def rank_correlations(rankings: dict[str, dict[str, float]], min_common: int = 3) -> list[dict]:
    """Spearman's rho between every two rankings over the strategies both have (at least `min_common`)."""
    from scipy.stats import spearmanr

    out = []
    for a, b in itertools.combinations(rankings, 2):
        common = sorted(set(rankings[a]) & set(rankings[b]))
        if len(common) < min_common:
            continue
        rho, p = spearmanr([rankings[a][s] for s in common], [rankings[b][s] for s in common])
        out.append({"a": a, "b": b, "strategies": len(common), "spearman": float(rho), "p_value": float(p)})
    return out


def correlations_markdown(correlations: list[dict]) -> str:
    lines = ["| ranking A | ranking B | common strategies | Spearman rho | p |", "|---|---|---|---|---|"]
    for c in correlations:
        lines.append(f"| {c['a']} | {c['b']} | {c['strategies']} | {c['spearman']:+.2f} | {c['p_value']:.3f} |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker processes
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=90)


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def size_vs_average_png(boards: dict[str, list[dict]]) -> bytes:
    """Figure 2: average score against subset size, one marker style per scale, one colour per family, with
    the spread over seeds as error bars; points of one family at one scale are joined by size."""
    plt, fig, ax = _figure(6.5, 4.2)
    families = sorted({family(r["strategy"]) for rows in boards.values() for r in rows})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    markers = itertools.cycle("osD^v")
    for scale, rows in boards.items():
        marker = next(markers)
        for fam in families:
            points = sorted((r["dataset_size"], r["average"], r["std"]) for r in rows if family(r["strategy"]) == fam)
            if not points:
                continue
            sizes, averages, stds = zip(*points)
            ax.errorbar(sizes, averages, yerr=stds, color=colours[fam], marker=marker, capsize=2, linewidth=1,
                        label=f"{fam} ({scale})" if len(boards) > 1 else fam)
    ax.set_xscale("log")
    ax.set_xlabel("subset size (samples)")
    ax.set_ylabel("average zero-shot score")
    ax.set_title("Subset size vs average score, per strategy family", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(plt, fig)


def correlation_png(rankings: dict[str, dict[str, float]], correlations: list[dict]) -> bytes:
    """Figure 3: the matrix of Spearman's rho between every two rankings (blank where too few in common)."""
    import numpy as np

    plt, fig, ax = _figure(5.5, 4.6)
    labels = list(rankings)
    matrix = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for c in correlations:
        i, j = labels.index(c["a"]), labels.index(c["b"])
        matrix[i, j] = matrix[j, i] = c["spearman"]
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
    for i, j in itertools.product(range(len(labels)), repeat=2):
        if not np.isnan(matrix[i, j]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(matrix[i, j]) > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("Rank correlation of strategies between scales (ImageNet)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(plt, fig)
