"""The leaderboard: strategies of one scale ranked by their mean zero-shot score over training seeds, with the
seeds' spread and which gaps exceed it, and beside it the evaluation noise: the 95% bootstrap interval of the
average over the test samples (written by the evaluation as `eval_noise.json`) and which gaps exceed that."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

# Orderings the paper reports (CLIP-score filtering > basic filtering > no filtering), checked on every board.
PAPER_ORDERING = (("clip_score_l14_30pct", "basic"), ("clip_score_b32_30pct", "basic"), ("basic", "no_filter"))
SIGNIFICANCE = 0.05  # one-sided Welch t-test over seeds
EVAL_CONFIDENCE = 0.95  # the bootstrap interval over test samples


@dataclass
class Entry:
    strategy: str
    dataset_size: int
    samples_seen: int | None                 # by the checkpoints' own record; None where it has none
    seed_tasks: dict[int, dict[str, float]]  # seed -> task key -> main metric
    groups: dict[str, float] = field(default_factory=dict)  # group -> mean over seeds
    track: str = "filtering"                 # or "byod": samples from outside the pool are mixed in
    lineage: dict = field(default_factory=dict)  # hashes and paths back to the pool (see lineage_of)
    # seed -> the average over tasks on each bootstrap resample of the test samples (eval_noise.json); the same
    # resamples for every checkpoint, so two rows' replicates pair up. Empty for results scored before it existed.
    noise_replicates: dict[int, list[float]] = field(default_factory=dict)

    @property
    def seed_averages(self) -> list[float]:
        return [statistics.mean(tasks.values()) for tasks in self.seed_tasks.values() if tasks]

    @property
    def average(self) -> float:
        return statistics.mean(self.seed_averages) if self.seed_averages else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation of the average over seeds (0 with one seed)."""
        return statistics.stdev(self.seed_averages) if len(self.seed_averages) > 1 else 0.0

    @property
    def eval_replicates(self) -> np.ndarray | None:
        """The row's average (mean over seeds) on each resample; None unless every scored seed has them."""
        seeds = [seed for seed, tasks in self.seed_tasks.items() if tasks]
        reps = [self.noise_replicates.get(seed) for seed in seeds]
        if not seeds or any(r is None for r in reps) or len({len(r) for r in reps}) != 1:
            return None
        return np.mean(np.asarray(reps, dtype=np.float64), axis=0)

    @property
    def eval_noise(self) -> tuple[float, float] | None:
        """The 95% interval of the average over resamples of the test samples (None without replicates)."""
        reps = self.eval_replicates
        return None if reps is None else percentile_interval(reps)

    @property
    def tasks(self) -> dict[str, float]:
        """Each task's main metric, averaged over the seeds that have it."""
        keys = sorted({k for tasks in self.seed_tasks.values() for k in tasks})
        return {k: statistics.mean(t[k] for t in self.seed_tasks.values() if k in t) for k in keys}


def rank(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.average, reverse=True)


def p_greater(a: Entry, b: Entry) -> float | None:
    """One-sided p-value that a's average over seeds exceeds b's (Welch's t-test); None without at least two
    seeds on each side, where the noise is unknown."""
    x, y = a.seed_averages, b.seed_averages
    if len(x) < 2 or len(y) < 2:
        return None
    from scipy.stats import ttest_ind

    p = float(ttest_ind(x, y, equal_var=False, alternative="greater").pvalue)
    if math.isnan(p):  # no spread at all on either side: the sign of the gap decides
        return 0.0 if a.average > b.average else 1.0
    return p


def beyond_noise(a: Entry, b: Entry) -> bool | None:
    p = p_greater(a, b)
    return None if p is None else p < SIGNIFICANCE


def percentile_interval(reps: np.ndarray, confidence: float = EVAL_CONFIDENCE) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(reps, [tail, 100 - tail])
    return float(low), float(high)


def beyond_eval_noise(a: Entry, b: Entry) -> bool | None:
    """Whether a's average exceeds b's on 95% of the paired resamples of the test samples (the interval of the
    gap excludes 0); None where either row has no replicates (results scored before they were kept)."""
    ra, rb = a.eval_replicates, b.eval_replicates
    if ra is None or rb is None or len(ra) != len(rb):
        return None
    return percentile_interval(ra - rb)[0] > 0


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def to_markdown(entries: list[Entry]) -> str:
    """A markdown table: rank, strategy, sizes, seeds, mean average ± std over seeds, the evaluation-noise
    interval, whether it beats the next row beyond the seeds' noise and beyond the evaluation noise, each task
    group, then each task."""
    ranked = rank(entries)
    groups = sorted({g for e in ranked for g in e.groups}, key=_group_order)
    tasks = sorted({t for e in ranked for t in e.tasks})
    header = ["rank", "strategy", "track", "dataset_size", "samples_seen", "seeds", "average", "std",
              "eval_noise_95", "beats_next", "beats_next_eval", *groups, *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, e in enumerate(ranked, 1):
        beats = beyond_noise(e, ranked[i]) if i < len(ranked) else None
        beats_eval = beyond_eval_noise(e, ranked[i]) if i < len(ranked) else None
        cells = [str(i), _marked(e), e.track, str(e.dataset_size),
                 "unknown" if e.samples_seen is None else str(e.samples_seen), str(len(e.seed_averages)),
                 f"{e.average:.4f}", f"{e.std:.4f}", _interval_text(e.eval_noise),
                 {True: "yes", False: "within noise", None: ""}[beats],
                 {True: "yes", False: "within eval noise", None: ""}[beats_eval],
                 *(f"{e.groups[g]:.4f}" if g in e.groups else "" for g in groups),
                 *(f"{e.tasks[t]:.4f}" if t in e.tasks else "" for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOISE_NOTE = ("std and beats_next: the spread over training seeds (one-sided Welch t-test, p < 0.05). "
              "eval_noise_95: the 95% bootstrap interval of the average over resamples of each task's test samples; "
              "beats_next_eval: the paired interval of the gap to the next row excludes 0 (blank: results scored "
              "before per-sample outcomes were kept).")

TRACK_TITLES = {"filtering": "Filtering track", "byod": "Bring-your-own-data track"}


def board_markdown(entries: list[Entry]) -> str:
    """One ranked table per track (the paper ranks the tracks apart), each followed by its rows' lineage."""
    parts = []
    for track in sorted({e.track for e in entries}, key=lambda t: list(TRACK_TITLES).index(t)):
        rows = [e for e in entries if e.track == track]
        parts += [f"### {TRACK_TITLES[track]}", to_markdown(rows), NOISE_NOTE, "Lineage:", lineage_markdown(rows)]
    return "\n\n".join(parts)


def lineage_markdown(entries: list[Entry]) -> str:
    """Where each row came from: short hashes of its subset, checkpoints and pool, the versions of the strategy and
    of the scale's recipe it was made under (marked where a user's file overrode them), and the code revision."""
    lines = ["| strategy | subset sha256 | checkpoint sha256 (per seed) | pool version | strategy version | "
             "scale version | code revision | consistent |", "|---|---|---|---|---|---|---|---|"]
    for e in rank(entries):
        lin = e.lineage
        ckpts = ", ".join(c["sha256"][:12] for c in lin.get("checkpoints", {}).values())
        consistent = {True: "yes", False: "**no: re-materialize**", None: "unknown"}[lin.get("consistent")]
        strategy_version = lin.get("strategy_version", "")
        if lin.get("overrides"):
            strategy_version += f" (override: {', '.join(lin['overrides'])})"
        scale_version = lin.get("scale_version", "") + (" (override)" if lin.get("scale_override") else "")
        lines.append(f"| {e.strategy} | {lin.get('subset_sha256', '')[:12]} | {ckpts} | "
                     f"{lin.get('pool_version', '')[:12]} | {strategy_version} | {scale_version} | "
                     f"{lin.get('code_revision', '')} | {consistent} |")
    return "\n".join(lines)


def _marked(e: Entry) -> str:
    """The strategy's name, marked where a user's file overrode its rule or the scale's recipe on purpose: the row
    does not measure the built-in one."""
    overridden = e.lineage.get("overrides") or e.lineage.get("scale_override")
    return f"{e.strategy} (override)" if overridden else e.strategy


def board_rows(entries: list[Entry]) -> list[dict]:
    """The board as plain data (leaderboard.json): each row's scores, spread, rank in its track, lineage."""
    rows = []
    for track in sorted({e.track for e in entries}):
        ranked = rank([x for x in entries if x.track == track])
        for i, e in enumerate(ranked, 1):
            beats = beyond_noise(e, ranked[i]) if i < len(ranked) else None
            beats_eval = beyond_eval_noise(e, ranked[i]) if i < len(ranked) else None
            rows.append({"track": track, "rank": i, "strategy": e.strategy, "dataset_size": e.dataset_size,
                         "samples_seen": e.samples_seen, "seeds": len(e.seed_averages), "average": e.average,
                         "std": e.std, "beats_next": beats,
                         "eval_noise_95": None if e.eval_noise is None else list(e.eval_noise),
                         "beats_next_beyond_eval_noise": beats_eval,
                         "seed_averages": {f"seed_{seed}": statistics.mean(tasks.values())
                                           for seed, tasks in e.seed_tasks.items() if tasks},
                         "groups": e.groups, "tasks": e.tasks, "lineage": e.lineage})
    return rows


def ordering_report(entries: list[Entry], pairs=PAPER_ORDERING) -> list[dict]:
    """For each (better, worse) pair the paper reports that is on the board: the gap and whether it holds
    beyond the seeds' noise."""
    by_name = {e.strategy: e for e in entries}
    report = []
    for better, worse in pairs:
        if better in by_name and worse in by_name:
            a, b = by_name[better], by_name[worse]
            p = p_greater(a, b)
            report.append({"claim": f"{better} > {worse}", "gap": a.average - b.average, "p_value": p,
                           "holds_beyond_noise": None if p is None else p < SIGNIFICANCE,
                           "holds_beyond_eval_noise": beyond_eval_noise(a, b)})
    return report


def ordering_markdown(report: list[dict]) -> str:
    lines = ["| paper's ordering | gap in average | one-sided p (Welch, seeds) | holds beyond noise | "
             "holds beyond eval noise |", "|---|---|---|---|---|"]
    words = {True: "yes", False: "no", None: "unknown"}
    for r in report:
        p = "n/a (one seed)" if r["p_value"] is None else f"{r['p_value']:.4f}"
        lines.append(f"| {r['claim']} | {r['gap']:+.4f} | {p} | {words[r['holds_beyond_noise']]} | "
                     f"{words[r.get('holds_beyond_eval_noise')]} |")
    return "\n".join(lines)


def _group_order(group: str) -> tuple[int, str]:
    known = ["ImageNet", "ImageNet distribution shifts", "VTAB", "Retrieval"]
    return (known.index(group), group) if group in known else (len(known), group)
