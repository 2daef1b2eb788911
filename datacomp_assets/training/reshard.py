"""Write exactly a subset's samples from the pool's webdataset shards into training shards.

A uid listed k times in the subset is written k times (the reference's up-weighting). Pool shards are
streamed one at a time, so memory holds one sample, not the pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.shards import brace_pattern, check_shards, iter_webdataset
from datacomp_assets.core.uids import UidLookup, sort_uids
from datacomp_assets.training.faces import FaceBoxes, blur_faces


@dataclass
class ReshardSummary:
    samples_written: int
    unique_uids: int
    shards: int
    missing_uids: int
    shard_pattern: str
    faces_blurred: int = 0


def reshard(shard_dirs: str | Path | Sequence[str | Path], subset: np.ndarray, out_dir: str | Path, shard_size: int,
            min_shards: int = 4, face_bboxes: Mapping[str, list] | None = None) -> ReshardSummary:
    """Write the subset's samples (with multiplicity) into `out_dir/{00000000..}.tar`.

    `shard_dirs`: the pool's shard directory, and for a bring-your-own-data subset the external sources' too.

    Faces listed in `face_bboxes` (uid -> normalized boxes, from the pool metadata: a dict, or `faces_in_pool`'s
    columnar FaceBoxes, asked sample by sample) are blurred on the way, so no unblurred face reaches training.

    Written to a temporary directory and renamed, so a crash never leaves partial shards behind. A finished
    directory records what it was cut from (`manifest.json`); asked again for the same, it is reused as is,
    so a resumed training run reads the very shards it started on.
    """
    dirs = [shard_dirs] if isinstance(shard_dirs, (str, os.PathLike)) else list(shard_dirs)
    pool_tars = [tar for d in dirs for tar in sorted(Path(d).glob("*.tar"))]
    if not pool_tars:
        raise FileNotFoundError(f"no webdataset shards (*.tar) in {', '.join(map(str, dirs))}; "
                                "materialize pool_shards first")
    out_dir = Path(out_dir)
    source = _source_key(pool_tars, subset, shard_size, min_shards, face_bboxes)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
        if recorded.get("source") == source:
            return ReshardSummary(**recorded["summary"])
    # The subset's distinct uids and how often each is listed, looked up sample by sample (not a Counter of
    # strings, about 100 bytes a uid: 4 GB for a medium-scale subset).
    ordered = sort_uids(subset)
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    wanted, starts = UidLookup(ordered[first]), np.flatnonzero(first)
    copies_of = np.diff(np.append(starts, len(ordered)))
    found = np.zeros(len(wanted), dtype=bool)
    total = len(ordered)
    if total == 0:
        raise ValueError("the subset is empty: nothing to train on")
    # A pool shard cut short would silently train on fewer samples, or fail half-way naming no file: check every
    # one (headers only) before writing anything.
    check_shards(pool_tars, fix="Materialize pool_shards again (it fetches a damaged shard again), or for a shard "
                                "outside the pool, the asset that wrote it.")
    # Enough shards for shard sampling with replacement to mix, never more than the shard size.
    per_shard = max(1, min(shard_size, -(-total // min_shards)))

    tmp_dir = temporary_sibling(out_dir)
    tmp_dir.mkdir(parents=True)
    written, shard_index, in_shard, blurred = 0, 0, 0, 0
    tar = None
    for pool_tar in pool_tars:
        for _, files in iter_webdataset(pool_tar):
            if "json" not in files:
                continue
            uid = json.loads(files["json"]).get("uid")
            at = wanted.find(uid)
            if at is None:
                continue
            copies, found[at] = int(copies_of[at]), True
            boxes = face_bboxes.get(uid) if face_bboxes else None
            if boxes and "jpg" in files:
                files = {**files, "jpg": blur_faces(files["jpg"], boxes)}
                blurred += 1
            for _ in range(copies):
                if tar is None or in_shard == per_shard:
                    if tar is not None:
                        tar.close()
                    tar = tarfile.open(tmp_dir / f"{shard_index:08d}.tar", "w")
                    shard_index, in_shard = shard_index + 1, 0
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{written:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written, in_shard = written + 1, in_shard + 1
    if tar is not None:
        tar.close()
    summary = ReshardSummary(
        samples_written=written, unique_uids=int(found.sum()), shards=shard_index,
        missing_uids=len(wanted) - int(found.sum()),
        shard_pattern=brace_pattern(out_dir, shard_index), faces_blurred=blurred,
    )
    (tmp_dir / "manifest.json").write_text(json.dumps({"source": source, "summary": asdict(summary)}, indent=1))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return summary


def _source_key(pool_tars: list[Path], subset: np.ndarray, shard_size: int, min_shards: int,
                face_bboxes: Mapping | None) -> str:
    """A digest of everything the training shards are cut from (pool shards by name, size and time)."""
    h = hashlib.sha256(np.ascontiguousarray(subset).tobytes())
    for tar in pool_tars:
        stat = tar.stat()
        h.update(f"{tar.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    faces = face_bboxes.digest() if isinstance(face_bboxes, FaceBoxes) else sorted((face_bboxes or {}).items())
    h.update(json.dumps([shard_size, min_shards, faces]).encode())
    return h.hexdigest()
