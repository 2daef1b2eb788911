"""The pool's metadata at a published scale: DataComp's parquet and npz as they are, linked, not copied.

The published files already hold what the miniature computes from images (OpenAI CLIP B/32 and L/14 scores and
embeddings, face boxes, sha256), and DataComp removed unsafe and evaluation-duplicate samples before publishing.
Caption features (fastText and CLD3 languages, word, character and token counts) are not computed here: a rule
that reads one computes it on the rows it needs, once (`core.caption_features.CaptionFeatureStore`). What is
computed here is the pool's sorted uid index, which every rule's subset is read from (`core.uid_index`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from datacomp_assets.core.integrity import RecordedTable, file_problems, require_unique_pool
from datacomp_assets.core.layout import Asset
from datacomp_assets.core.schema import validate_metadata
from datacomp_assets.core.uid_index import write_uid_index


def _link(source: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source.resolve())


def link_published_metadata(published_files: Sequence[Path], out_dir: str | os.PathLike,
                            log: Callable[[str], None] = print) -> dict:
    """Link every published `<stem>.parquet` and its `<stem>.npz` into `out_dir` (links of files no longer
    published are removed) and write the pool's uid index; returns counts and timings."""
    if not published_files:
        raise FileNotFoundError("no published metadata files; materialize pool_index first")
    out_dir = Path(out_dir)
    recorded = RecordedTable(out_dir)
    for source in published_files:  # a malformed file fails here, naming it, before anything is linked
        # Values (each uid once, finite scores in range) are read only from files not recorded as they are now.
        problems = [] if recorded.unchanged(source) else file_problems(source)
        if problems:
            raise ValueError(f"{source.resolve()}: {'; '.join(problems)}: not the file DataComp published. Replace "
                             f"it with the published file (download it again), then materialize "
                             f"{Asset.POOL_METADATA} again.")
        validate_metadata(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = {source.name for source in published_files}
    for stale in out_dir.glob("*.parquet"):
        if stale.name not in names:
            stale.unlink()
            stale.with_suffix(".npz").unlink(missing_ok=True)
    embeddings = 0
    for source in published_files:
        _link(source, out_dir / source.name)
        if source.with_suffix(".npz").exists():
            _link(source.with_suffix(".npz"), out_dir / source.with_suffix(".npz").name)
            embeddings += 1
    linked = time.perf_counter()
    index = write_uid_index(out_dir)
    require_unique_pool(index, f"Replace the published file that repeats it with the file DataComp published "
                               f"(download it again), then materialize {Asset.POOL_METADATA} again.")
    log(f"pool_metadata: {len(published_files)} files linked; uid index of {index.rows:,} rows written in "
        f"{time.perf_counter() - linked:.1f} s")
    return {"files": len(published_files), "embedding_files": embeddings, "rows_indexed": index.rows,
            "uid_index_seconds": time.perf_counter() - linked, "seconds": time.perf_counter() - start}
