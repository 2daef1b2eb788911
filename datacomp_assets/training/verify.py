"""Whether a strategy's trained checkpoints are usable: every seed's final checkpoint is there, and every
checkpoint file loads safely and runs. Checkpoints that a resumed training set aside as unreadable (`*.unreadable`)
are reported but do not fail it: the final checkpoints were trained past them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.scales import ScaleConfig


def verify_checkpoints(layout: Layout, scale: ScaleConfig, strategy: str,
                       check: Callable[[str, Path], str | None]) -> tuple[bool, dict]:
    """(passed, findings). `check(model, path)` returns None for a good checkpoint, else what is wrong with it."""
    root = layout.training_logs(scale.name, strategy)
    missing, failures, checked = [], {}, 0
    for seed in scale.seeds:
        final = layout.seed_checkpoint(scale.name, strategy, seed, scale.epochs)
        if not final.is_file():
            missing.append(str(final.relative_to(root)))
        for path in sorted(final.parent.glob("epoch_*.pt")):
            checked += 1
            error = check(scale.model, path)
            if error:
                failures[str(path.relative_to(root))] = error
    set_aside = sorted(str(p.relative_to(root)) for p in root.glob("*/checkpoints/*.unreadable"))
    findings = {"checkpoints_checked": checked, "final_checkpoints_missing": missing, "failures": failures,
                "set_aside_unreadable": set_aside}
    if missing:
        findings["fix"] = "materialize checkpoint again: each seed trains (or resumes) to its final checkpoint"
    return not missing and not failures, findings
