"""The pool at the paper's scales: DataComp's published metadata, fetched from the Hugging Face Hub or a mirror.

The dataset repos ``mlfoundations/datacomp_{small,medium,large,xlarge}`` hold one parquet per shard (reference
columns) and, optionally, an ``.npz`` of embeddings with the same stem. The upstream tooling fetches them with
``huggingface_hub.snapshot_download`` and feeds the parquets to img2dataset; we do the same, but also accept a
local mirror (a copy in the published layout), so a machine without access to huggingface.co can still run, and
fail at once, with both ways out named, when neither is available.

A mirror is either a snapshot of the repo (``huggingface-cli download``; xlarge's files sit in ``part_*/``
folders) or the ``--data_dir`` that DataComp's ``download_upstream.py`` leaves: ``metadata/`` with the parquet (and
the npz with ``--download_npz``) beside ``shards/``, img2dataset's output, whose own ``NNNNNNNN.parquet`` files are
not metadata and are never read as such.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core import settings
from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.scales import UPSTREAM_METADATA
from datacomp_assets.core.schema import NPZ_KEYS, POOL_METADATA_SCHEMA, validate_metadata

# The setting that points at a local mirror: a resource field, defaulting to this environment variable.
MIRROR_SETTING = "published_mirror_dir"
MIRROR_ENV = settings.DATACOMP_MIRROR.name
# Seconds to wait for the Hub before declaring it unreachable: a dead network must fail fast, not hang.
HUB_TIMEOUT_S = 10.0

# The columns img2dataset needs from the metadata: url and caption to fetch, uid to keep, face boxes to blur,
# sha256 to verify that the bytes are the ones the metadata (and its scores) describe.
DOWNLOAD_INDEX_COLUMNS = ("uid", "url", "text", "face_bboxes", "sha256")

@dataclass(frozen=True)
class PublishedSource:
    """Where a paper scale's published metadata comes from."""

    scale: str
    repo_id: str = ""              # default: mlfoundations/datacomp_{scale}
    mirror_dir: str | None = None  # a local copy in the published layout; None: the Hugging Face Hub
    include_npz: bool = False      # embeddings: ~25x the parquet size (75 GB at small)

    def __post_init__(self) -> None:
        if not self.repo_id:
            object.__setattr__(self, "repo_id", f"mlfoundations/datacomp_{self.scale}")


def offline_message(source: PublishedSource, reason: str) -> str:
    """The one error raised when the Hub cannot be used: it names both ways out."""
    return (
        f"cannot fetch the published DataComp metadata ({source.repo_id}): {reason}. Either set "
        f"`{MIRROR_SETTING}` (or the environment variable {MIRROR_ENV}) to a local copy in the published "
        f"layout (one <shard>.parquet per shard, optionally <shard>.npz beside it), or `data_dir` in a scale "
        f"file to the --data_dir of DataComp's download_upstream.py, or run where huggingface.co is reachable. "
        f"A copy can be made on such a machine with: huggingface-cli download {source.repo_id} --repo-type dataset "
        f"--local-dir /path/to/mirror (`hf download` with huggingface_hub 1.0 or newer)"
    )


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later setting counts too.
    import huggingface_hub.constants

    return settings.hub_offline() or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub cannot be reached" (not "the repo is missing").

    huggingface_hub raises its HTTP client's transport errors as they are; which client it uses depends on
    its release (requests, httpx, httpx2), so collect the transport error class of each one installed.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # Not every OSError: a full disk during the download must not be reported as a network failure.
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError,
                                         TimeoutError, socket.gaierror]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def published_files(root: str | os.PathLike) -> list[Path]:
    """The metadata parquet files under `root` (fetched or linked by `fetch_published_metadata`), in order."""
    return _metadata_files(Path(root), ".parquet")


def metadata_root(mirror: str | os.PathLike) -> Path:
    """Where a mirror's metadata files are: its `metadata/` folder where it has one (download_upstream.py's
    --data_dir), else the mirror itself (a snapshot of the Hub repo)."""
    mirror = Path(mirror)
    return mirror / UPSTREAM_METADATA if (mirror / UPSTREAM_METADATA).is_dir() else mirror


def mirror_files(mirror: str | os.PathLike) -> list[Path]:
    """A mirror's metadata parquet files, in order."""
    return _metadata_files(metadata_root(mirror), ".parquet")


def _metadata_files(root: Path, suffix: str) -> list[Path]:
    """Every `*<suffix>` under root, skipping hidden folders (the Hub client's `.cache/`) and img2dataset's shards
    (a `<stem>.parquet` beside `<stem>.tar` or `<stem>_stats.json` lists a shard's samples, not the pool's)."""
    return sorted(p for p in root.rglob(f"*{suffix}")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and not _is_shard_file(p))


def _is_shard_file(path: Path) -> bool:
    return path.with_suffix(".tar").exists() or path.with_name(f"{path.stem}_stats.json").exists()


def npz_advice(scale: str, metadata_folder: Path | None = None, hub: bool = True) -> str:
    """How to get the embeddings that download_upstream.py leaves out unless asked, into `metadata_folder` (the
    folder that holds the parquet files) where it is known; with `hub`, also the way for a fetch from the Hub."""
    if metadata_folder is None:
        where, folder = "--data_dir DIR", "DIR/metadata"
    elif metadata_folder.name == UPSTREAM_METADATA:
        where, folder = f"--data_dir {metadata_folder.parent}", str(metadata_folder)
    else:
        where, folder = f"--data_dir DIR --metadata_dir {metadata_folder}", str(metadata_folder)
    return (f"DataComp's `python download_upstream.py --scale {scale} {where} --download_npz --overwrite_metadata "
            f"--skip_shards` fetches them beside the parquet files (without --overwrite_metadata it skips a metadata "
            f"folder that exists), or `huggingface-cli download mlfoundations/datacomp_{scale} --repo-type dataset "
            f"--include '*.npz' --local-dir {folder}`"
            + ("; fetching from the Hub, set the published resource's include_npz" if hub else ""))


def files_without_npz(parquets: list[Path]) -> list[Path]:
    return [p for p in parquets if not p.with_suffix(".npz").exists()]


# The embeddings every npz reader needs; the rest of NPZ_KEYS are read only where a method asks (negCLIPLoss and
# HYPE pair l14_txt with it), so an npz trimmed to l14_img (30% of the bytes) serves the image-embedding methods.
REQUIRED_NPZ_KEYS = ("l14_img",)


def _check_npz(path: Path) -> None:
    # np.load reads only the zip directory here, not the arrays.
    with np.load(path) as npz:
        missing = [key for key in REQUIRED_NPZ_KEYS if key not in npz.files]
    if missing:
        raise ValueError(f"{path}: missing embedding arrays {', '.join(missing)} (the published npz holds "
                         f"{', '.join(NPZ_KEYS)}); fetch the file again")


def _link_or_copy(src: Path, dst: Path) -> None:
    # A symlink costs nothing (the small scale's npz files alone are 75 GB); copy where links are refused.
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        shutil.copy2(src, dst)


def _from_mirror(source: PublishedSource, dest_dir: Path) -> list[Path]:
    mirror = Path(source.mirror_dir)
    if not mirror.is_dir():
        raise ValueError(f"{MIRROR_SETTING}={mirror} is not a directory")
    root = metadata_root(mirror)
    parquets = _metadata_files(root, ".parquet")
    if not parquets:
        raise ValueError(f"{MIRROR_SETTING}={mirror} holds no metadata .parquet files (expected the published "
                         f"layout, or download_upstream.py's --data_dir with its {UPSTREAM_METADATA}/ folder)")
    npz_by_stem = {p.stem: p for p in _metadata_files(root, ".npz")}
    names = [p.name for p in parquets]
    if len(set(names)) != len(names):
        raise ValueError(f"{mirror}: two parquet files share a name; shards must have unique names")
    fetched = []
    for parquet in parquets:
        validate_metadata(parquet)  # raises ValueError naming the file and the missing columns
        _link_or_copy(parquet, dest_dir / parquet.name)
        npz = npz_by_stem.get(parquet.stem)
        if npz is None and source.include_npz:
            raise ValueError(f"{parquet}: no {parquet.stem}.npz in the mirror (include_npz is set)")
        if npz is not None:  # linked whenever there: the image-based rules, SemDeDup and VAS read them
            _check_npz(npz)
            _link_or_copy(npz, dest_dir / npz.name)
        fetched.append(dest_dir / parquet.name)
    return fetched


def _from_hub(source: PublishedSource, dest_dir: Path) -> list[Path]:
    from huggingface_hub import HfApi, snapshot_download

    if hub_offline():
        raise RuntimeError(offline_message(source, "HF_HUB_OFFLINE is set"))
    unreachable = network_errors()
    try:
        # A cheap request first, with a short timeout: a missing network fails here in seconds.
        HfApi().repo_info(source.repo_id, repo_type="dataset", timeout=HUB_TIMEOUT_S)
        snapshot_download(
            repo_id=source.repo_id,
            repo_type="dataset",
            allow_patterns=["*.parquet", "*.npz"] if source.include_npz else ["*.parquet"],
            local_dir=dest_dir,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except unreachable as exc:
        raise RuntimeError(offline_message(source, f"huggingface.co is unreachable ({exc})")) from exc
    parquets = _metadata_files(dest_dir, ".parquet")
    for parquet in parquets:
        validate_metadata(parquet)
    return parquets


def fetch_published_metadata(source: PublishedSource, dest_dir: str | os.PathLike) -> list[Path]:
    """Put the scale's metadata parquets (and npz files, if asked) in dest_dir; return the parquet paths.

    From the mirror the files are symlinked (copied where links fail); from the Hub they are downloaded with
    the upstream patterns (resumable: files already there are skipped). Every parquet is checked for the
    reference columns. Raises RuntimeError at once, naming the mirror setting and huggingface.co, when the
    Hub is switched off (HF_HUB_OFFLINE) or unreachable and no mirror is set.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if source.mirror_dir:
        return _from_mirror(source, dest)
    return _from_hub(source, dest)


def write_download_index(parquet_files: list[str | os.PathLike], out_path: str | os.PathLike) -> dict:
    """Write img2dataset's input for a paper scale: one parquet of uid, url, text, face_bboxes, sha256.

    Streamed one record batch at a time (bounded memory: the medium scale has 128M rows), and written under a
    temporary name first, so an interrupted run never leaves a truncated index behind.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([POOL_METADATA_SCHEMA.field(name) for name in DOWNLOAD_INDEX_COLUMNS])
    tmp = temporary_sibling(out)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for path in parquet_files:
                validate_metadata(path)
                for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=list(schema.names)):
                    # Cast: published files may differ in minor types (e.g. float32 boxes); the index may not.
                    writer.write_table(pa.Table.from_batches([batch]).select(schema.names).cast(schema))
                    rows += batch.num_rows
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rows": rows, "files": len(parquet_files), "path": str(out)}


def build_mirror_from_pool(metadata_dir: str | os.PathLike, mirror_dir: str | os.PathLike) -> list[Path]:
    """Write `mirror_dir/metadata/<shard>.parquet` (reference columns only) and `<shard>.npz` beside it.

    The input is a pool_metadata folder (one .parquet + .npz per shard, with our extra feature columns). The
    result looks like a published scale, so a paper-scale run can be rehearsed offline (tests do so too).
    Returns the mirror's parquet paths.
    """
    src = Path(metadata_dir)
    out = Path(mirror_dir) / "metadata"
    out.mkdir(parents=True, exist_ok=True)
    parquets = sorted(src.glob("*.parquet"))
    if not parquets:
        raise ValueError(f"{src} holds no .parquet files")
    written = []
    for parquet in parquets:
        validate_metadata(parquet)
        table = pq.read_table(parquet, columns=POOL_METADATA_SCHEMA.names)  # one shard: 10,000 rows at most
        pq.write_table(table, out / parquet.name)
        npz = parquet.with_suffix(".npz")
        if npz.exists():
            shutil.copy2(npz, out / npz.name)
        written.append(out / parquet.name)
    return written
