"""Export a scale's subsets as the baselines' uid lists, under the file names DataComp's README gives them.

    python -m datacomp_assets.leaderboard.export_subsets --scale small --out uid_lists/ [--strategies basic ...]

Each file is the subset as it was materialized (the bytes its `lineage.json` hashed): a sorted `u8,u8` structured
array saved with `np.save`, which is what the reference's `baselines.py` writes, its `resharder.py --subset_file`
reads and its `evaluate.py --submit --samples` uploads. The reference's baselines get the reference's names
(`basic` -> `basic_filter.npy`, `laion2b` -> `laion.npy`, `clip_score_l14_30pct` ->
`clip_score_l14_30_percent.npy`, ...); every other strategy keeps its own name. Nothing is written unless every
requested subset exists, is valid, and no different file would be replaced (`--force` replaces them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from datacomp_assets.core import settings
from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.layout import Asset, Layout
from datacomp_assets.core.lineage import file_sha256, read_lineage
from datacomp_assets.core.scales import get_scale
from datacomp_assets.core.uids import load_subset

# The README's `--save_path` names of its baselines (its "Baselines" section), by our strategy names.
REFERENCE_NAMES = {
    "no_filter": "no_filter",
    "basic": "basic_filter",
    "laion2b": "laion",
    "text_based": "text_based",
    "image_based": "image_based",
    "image_based_clip_score_l14_30pct": "image_based_intersect_clip_score_l14_30_percent",
}
TOP_FRACTION = re.compile(r"clip_score_(b32|l14)_(\d+)pct")  # -> clip_score_l14_30_percent
THRESHOLD = re.compile(r"clip_score_(b32|l14)_thr(\d*\.\d+)")  # 0.25 -> clip_score_b32_25_threshold


def reference_file_name(strategy: str) -> str:
    """The file name the reference gives a baseline's uid list; other strategies keep their own name."""
    if strategy in REFERENCE_NAMES:
        return f"{REFERENCE_NAMES[strategy]}.npy"
    if match := TOP_FRACTION.fullmatch(strategy):
        return f"clip_score_{match[1]}_{match[2]}_percent.npy"
    if match := THRESHOLD.fullmatch(strategy):
        return f"clip_score_{match[1]}_{round(float(match[2]) * 100)}_threshold.npy"
    return f"{strategy}.npy"


@dataclass(frozen=True)
class Export:
    strategy: str
    source: Path  # the materialized subset
    target: Path  # where its uid list goes
    uids: int
    sha256: str


def materialized_strategies(layout: Layout, scale: str) -> list[str]:
    """The strategies with a subset file at this scale, by name."""
    root = layout.asset_dir(scale, Asset.SUBSET)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if layout.subset_file(scale, d.name).is_file())


def make_command(scale: str, strategy: str) -> str:
    return f"python -m datacomp_assets.run --scale {scale} --strategies {strategy} --subsets-only"


def plan(layout: Layout, scale: str, strategies: list[str], out: Path, force: bool) -> tuple[list[Export], list[str]]:
    """What to copy where, and one line per problem (a subset missing, invalid or unlike its record; a different
    file in the way; two strategies wanting one name). Reads the subsets; writes nothing."""
    exports, problems, claimed = [], [], {}
    for strategy in strategies:
        source, target = layout.subset_file(scale, strategy), out / reference_file_name(strategy)
        if target.parent != out:  # written only into `out`, whatever a name holds
            problems.append(f"{strategy!r} is not a strategy name")
            continue
        if not source.is_file():
            problems.append(f"{strategy}: no subset at {source}; make it with: {make_command(scale, strategy)}")
            continue
        try:
            uids = len(load_subset(source))  # the dtype and the order the resharder relies on
        except ValueError as err:
            problems.append(f"{strategy}: {err}; make it again with: {make_command(scale, strategy)}")
            continue
        sha256, recorded = file_sha256(source), read_lineage(source.parent).get("subset_sha256")
        if recorded and recorded != sha256:
            problems.append(f"{strategy}: {source} is not the subset its lineage.json records; make it again "
                            f"with: {make_command(scale, strategy)}")
            continue
        if target.name in claimed:
            problems.append(f"{strategy} and {claimed[target.name]} would both be written to {target}; "
                            "export them in separate runs")
            continue
        claimed[target.name] = strategy
        if target.exists() and not force and not (target.is_file() and file_sha256(target) == sha256):
            problems.append(f"{target} exists and holds something else; pass --force to replace it")
            continue
        exports.append(Export(strategy, source, target, uids, sha256))
    return exports, problems


def copy_atomically(source: Path, target: Path) -> None:
    """The subset's bytes under the target name, renamed into place (a reader never sees half a file)."""
    tmp = temporary_sibling(target)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def export_subsets(layout: Layout, scale: str, out: Path, strategies: list[str] | None = None,
                   force: bool = False) -> list[Export]:
    """Copy the scale's subsets (`strategies`, or every materialized one) into `out` under the reference's names.

    Raises ValueError, one line per problem, before writing anything when any requested subset is missing or
    invalid, or a different file would be replaced without `force`."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"export_subsets: {out} is a file; --out takes a directory")
    names = strategies or materialized_strategies(layout, scale)
    if not names:
        raise ValueError(f"export_subsets: no subset is materialized at scale {scale!r} under "
                         f"{layout.asset_dir(scale, Asset.SUBSET)}; make them with: "
                         f"python -m datacomp_assets.run --scale {scale} --subsets-only")
    exports, problems = plan(layout, scale, list(dict.fromkeys(names)), out, force)
    if problems:
        raise ValueError("\n".join(f"export_subsets: {p}" for p in problems))
    out.mkdir(parents=True, exist_ok=True)
    for export in exports:
        if not (export.target.is_file() and file_sha256(export.target) == export.sha256):
            copy_atomically(export.source, export.target)
    return exports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datacomp_assets.leaderboard.export_subsets",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--scale", required=True, help="the scale whose subsets to export")
    parser.add_argument("--strategies", nargs="+", metavar="NAME",
                        help="the strategies to export (default: every subset materialized at the scale)")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write the .npy files in")
    parser.add_argument("--force", action="store_true", help="replace files that hold something else")
    args = parser.parse_args(argv)
    layout = Layout(Path(settings.DATACOMP_HOME.get()))
    try:
        get_scale(args.scale)  # an unknown scale: one line naming the known ones
        exports = export_subsets(layout, args.scale, args.out, args.strategies, args.force)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 1
    for export in exports:
        print(f"{export.strategy:<40} {export.uids:>12,} uids  {export.target}")
    print(f"{len(exports)} uid lists in {args.out.resolve()}: each is a subset file for the reference's "
          "resharder.py -s, and for evaluate.py --submit --samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
