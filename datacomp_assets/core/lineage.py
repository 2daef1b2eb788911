"""Lineage records: what each artifact was made from, written beside it as `lineage.json`.

Each stage hashes what it wrote and names the hashes of what it read (the subset of a checkpoint, the
checkpoints of a score file), so a leaderboard row can be traced back to its pool, and an artifact made
from an input that has since changed is recognised as stale and redone instead of resumed.
The same hashes are the assets' Dagster data versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from datacomp_assets.core.files import temporary_sibling

LINEAGE_FILE = "lineage.json"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(paths) -> str:
    """One hash of several files' contents, in the order given (names do not enter: moving a tree keeps it).

    Files are hashed in parallel threads (hashlib releases the GIL), so a pool's thousands of metadata files
    hash at the disks' speed rather than one core's (about 0.7 GB/s here; benchmarks/lineage.py)."""
    from concurrent.futures import ThreadPoolExecutor

    h = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for digest in pool.map(file_sha256, list(paths)):
            h.update(digest.encode())
    return h.hexdigest()


def file_manifest(paths, recorded: dict[str, dict] | None = None) -> dict[str, dict]:
    """Name -> size, modification time (ns) and sha256 of each file (one directory's), hashed in parallel threads.

    A file whose size and modification time are those `recorded` (a previous manifest) keeps its recorded hash
    unread, so recording a directory again costs a hash of only the files written since."""
    from concurrent.futures import ThreadPoolExecutor

    paths, recorded = [Path(p) for p in paths], recorded or {}
    stats = [p.stat() for p in paths]

    def digest(i: int) -> str:
        entry = recorded.get(paths[i].name)
        return entry["sha256"] if entry and stat_unchanged(entry, stats[i]) else file_sha256(paths[i])

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, range(len(paths))))
    return {p.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": d}
            for p, st, d in zip(paths, stats, digests)}


def stat_unchanged(entry: dict, stat: os.stat_result) -> bool:
    """Whether a file's size and modification time are those its manifest entry records (any rewrite, even of the
    same size, sets the modification time); an entry recorded without a time never is."""
    return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def manifest_version(manifest: dict[str, dict]) -> str:
    """The files' one hash, in name order: `files_sha256` of the same files, sorted."""
    h = hashlib.sha256()
    for name in sorted(manifest):
        h.update(manifest[name]["sha256"].encode())
    return h.hexdigest()


def manifest_differences(directory: str | os.PathLike, manifest: dict[str, dict], pattern: str) -> list[str]:
    """How the files of `directory` matching `pattern` differ from `manifest`: missing, added, resized or rewritten
    files. Cheap enough for every reader: a file of the recorded size and modification time is not read; one whose
    time changed (or was not recorded) is hashed again, and named only when its content differs."""
    from concurrent.futures import ThreadPoolExecutor

    present = {}
    for path in Path(directory).glob(pattern):
        try:
            present[path.name] = (path, path.stat())
        except FileNotFoundError:  # a link whose file is gone
            pass
    resized = [name for name, entry in sorted(manifest.items())
               if name in present and present[name][1].st_size != entry["size"]]
    touched = [name for name, entry in sorted(manifest.items()) if name in present and name not in resized
               and not stat_unchanged(entry, present[name][1])]
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        digests = dict(zip(touched, pool.map(file_sha256, [present[name][0] for name in touched])))
    return ([f"{name} is missing" for name in sorted(set(manifest) - set(present))]
            + [f"{name} was added" for name in sorted(set(present) - set(manifest))]
            + [f"{name} has {present[name][1].st_size} bytes, not {manifest[name]['size']}" for name in resized]
            + [f"{name} was rewritten (same size, sha256 {digest[:12]}, not {manifest[name]['sha256'][:12]})"
               for name, digest in digests.items() if digest != manifest[name]["sha256"]])


def verified_version(directory: str | os.PathLike, pattern: str = "*.parquet",
                     what_to_do: str = "Materialize the asset that wrote it again.") -> str:
    """The version `directory`'s lineage records, once its files are checked against the recorded manifest;
    ValueError naming what changed, and `what_to_do`, when they are not the files that version hashed."""
    record = read_lineage(directory)
    version = record.get("pool_version", "unknown")
    manifest = record.get("manifest")
    if manifest is None:  # written before manifests were recorded
        return version
    differences = manifest_differences(directory, manifest, pattern)
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise ValueError(f"{directory} no longer holds the files of version {version[:12]} recorded in its "
                         f"{LINEAGE_FILE}: {shown}. {what_to_do}")
    return version


def text_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_lineage(directory: str | os.PathLike, record: dict) -> Path:
    """Write `lineage.json` atomically (a reader never sees half a record)."""
    path = Path(directory) / LINEAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_lineage(directory: str | os.PathLike) -> dict:
    """The record, or {} where none was written (artifacts made before lineage was recorded)."""
    path = Path(directory) / LINEAGE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and materialize the asset again") from None


def made_from_other_input(directory: str | os.PathLike, key: str, current: str) -> bool:
    """True when the artifact in `directory` records an input hash under `key` that differs from `current`."""
    recorded = read_lineage(directory).get(key)
    return recorded is not None and recorded != current


def path_in_record(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """How a record names a file: relative to the data root (`tiny/checkpoint/basic/logs/...`), so a tree copied or
    moved elsewhere is checked against its own files. A file outside the root keeps its absolute path."""
    path, root = Path(path).absolute(), Path(root).absolute()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def path_from_record(recorded: str, root: str | os.PathLike, record_dir: str | os.PathLike) -> Path:
    """The file a record (in `record_dir`, under the data root `root`) names: a relative path is the root's.

    An absolute path, as records written before paths were relative have, that runs through the record's own folder
    as the tree then had it (`<old root>/tiny/checkpoint/basic/logs/...`) is read in this tree instead, so an old
    tree that was copied or moved is checked against its own files too, never the original's. Any other absolute
    path names a file outside the tree, and is read where it is."""
    path, root = Path(recorded), Path(root).absolute()
    if not path.is_absolute():
        return root / path
    folder = Path(record_dir).absolute().relative_to(root).parts
    for start in range(len(path.parts) - len(folder), 0, -1):  # the last place the folder appears
        if path.parts[start:start + len(folder)] == folder:
            return root.joinpath(*path.parts[start:])
    return path


def code_revision() -> str:
    """The project's git commit (with `+dirty` for uncommitted changes), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
