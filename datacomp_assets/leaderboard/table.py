"""The leaderboard: strategies of one scale ranked by their average zero-shot score."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Entry:
    strategy: str
    dataset_size: int
    samples_seen: int
    tasks: dict[str, float]            # task key -> main metric
    groups: dict[str, float] = field(default_factory=dict)
    track: str = "filtering"           # or "byod": samples from outside the pool are mixed in

    @property
    def average(self) -> float:
        return sum(self.tasks.values()) / len(self.tasks) if self.tasks else float("nan")


def rank(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.average, reverse=True)


def to_markdown(entries: list[Entry]) -> str:
    """A markdown table: rank, strategy, dataset size, samples seen, average, then each task."""
    ranked = rank(entries)
    tasks = sorted({t for e in ranked for t in e.tasks})
    header = ["rank", "strategy", "track", "dataset_size", "samples_seen", "average", *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, e in enumerate(ranked, 1):
        cells = [str(i), e.strategy, e.track, str(e.dataset_size), str(e.samples_seen), f"{e.average:.4f}",
                 *(f"{e.tasks[t]:.4f}" if t in e.tasks else "" for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
