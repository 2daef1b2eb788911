"""The per-file and per-block work of pool_features: one module-level function of one picklable task each
(no Dagster).

`Engine.map_unordered` runs them in this machine's spawned processes or as Ray tasks. A task reads its inputs from
files (on a cluster, a file system every node shares: the data directory), never from the step's memory, and
writes its output under a temporary name, then renames it, so a task run twice (Ray's retry of a lost worker)
writes the same file again: nothing is lost or duplicated. What a task returns is small (a file's cluster ids or
hashes, a batch's scores); the reductions over the whole pool (centroids, counts, the covariance) are the step's.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import replace_atomically, write_parquet_atomically
from datacomp_assets.core.integrity import require_valid
from datacomp_assets.filtering import hyperbolic, image_based, metaclip, negclip, prototypes, semdedup, vas

_WORD = re.compile(r"[a-z]+")
_SPACES = re.compile(r"\s+")
NOT_WRITTEN = ("Not written: the pool's embeddings (its .npz files) or an input file of the scale's give values that "
               "are not finite numbers.")


@dataclass(frozen=True)
class FileTask:
    """One metadata file: its parquet, its rows in pool order, its place among the files (MetaCLIP's draws)."""
    parquet: str
    start: int
    stop: int
    index: int

    @property
    def stem(self) -> str:
        return Path(self.parquet).stem


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of an ordering the step wrote (a cluster batch of SemDeDup; a batch of negCLIPLoss's
    partition `part`)."""
    start: int
    stop: int
    part: int = 0


# ---------------------------------------------------------------- files


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """np.save through a temporary sibling (np.save itself would append .npy to the temporary name)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    replace_atomically(write, path)


def scratch_path(scratch: str, key: str, stem: str) -> Path:
    """One file's float16 copy of one npz array."""
    return Path(scratch) / key / f"{stem}.npy"


def mapped(path: str | os.PathLike) -> np.ndarray:
    """A read-only memory map of an .npy file (a task reads its blocks; its pages are the file's, not the heap's)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


@functools.lru_cache(maxsize=4)
def _loaded(path: str, stamp: tuple[int, int]) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def loaded(path: str | os.PathLike) -> np.ndarray:
    """An .npy file in memory, loaded once per worker process while it is unchanged (centroids, counts)."""
    stat = os.stat(path)
    return _loaded(str(path), (stat.st_size, stat.st_mtime_ns))


@dataclass(frozen=True)
class PoolArray:
    """The pool's rows of one npz key across the per-file scratch copies, in pool order: `[sorted rows]` and
    `[a:b]` read only the files that hold them. Picklable (paths and offsets), so a task on any node can gather."""
    paths: tuple[str, ...]
    starts: tuple[int, ...]  # each file's first pool row, and the pool's size last
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.starts[-1], self.width

    @property
    def ndim(self) -> int:
        return 2

    dtype = np.dtype(np.float16)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("PoolArray slices take no step")
            rows = np.arange(start, stop)
        else:
            rows = np.asarray(key)
            if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
                raise IndexError("PoolArray takes a slice or a 1-d array of ascending rows")
            if rows.size > 1 and np.any(np.diff(rows) < 0):
                raise IndexError("PoolArray's rows must be ascending")
        out = np.empty((rows.size, self.width), dtype=self.dtype)
        starts = np.asarray(self.starts)
        files = np.searchsorted(starts, rows, side="right") - 1
        for f in np.unique(files):
            where = np.flatnonzero(files == f)
            local = rows[where] - starts[f]
            array = mapped(self.paths[f])
            out[where] = array[int(local[0]):int(local[-1]) + 1][local - local[0]]
            del array
        return out


def _write(columns: Mapping[str, pa.Array | np.ndarray], task: FileTask, out: str) -> int:
    """uid (from the metadata file) and `columns`, checked, to `out` atomically; returns the rows written."""
    uid = pq.read_table(task.parquet, columns=["uid"])["uid"]
    if len(uid) != task.stop - task.start:
        raise ValueError(f"{task.parquet} has {len(uid)} rows, not the {task.stop - task.start} the step counted: it "
                         "changed while pool_features ran; materialize pool_metadata, then pool_features, again")
    table = pa.table({"uid": uid, **columns})
    require_valid(table, out, NOT_WRITTEN)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomically(table, out)
    return table.num_rows


def output(out_dir: str, task: FileTask) -> str:
    return str(Path(out_dir) / Path(task.parquet).name)


# ---------------------------------------------------------------- reading


def copy_embeddings(keys: Sequence[str], scratch: str, task: FileTask) -> str:
    """One file's npz arrays `keys` to float16 scratch copies (read in blocks by the other tasks)."""
    npz = Path(task.parquet).with_suffix(".npz")
    with np.load(npz) as arrays:
        for key in keys:
            if key not in arrays:
                raise ValueError(f"{npz} has no {key!r} embeddings (keys: {sorted(arrays)})")
            embeddings = arrays[key]
            if len(embeddings) != task.stop - task.start:
                raise ValueError(f"{npz}: {len(embeddings)} embeddings for {task.stop - task.start} metadata rows")
            save_npy(embeddings.astype(np.float16, copy=False), scratch_path(scratch, key, task.stem))
    return task.stem


# ---------------------------------------------------------------- captions


def text_concepts(texts: Sequence[str], vocabulary: Mapping[str, str]) -> list[str | None]:
    """The class named by the first caption word found in the vocabulary, or None."""
    out = []
    for text in texts:
        out.append(next((vocabulary[w] for w in _WORD.findall((text or "").lower()) if w in vocabulary), None))
    return out


def caption_hash(texts: Sequence[str | None]) -> np.ndarray:
    """A 64-bit hash of each caption, lowercased with runs of spaces collapsed: equal captions, equal hashes."""
    import pandas as pd

    normalized = np.array([_SPACES.sub(" ", (t or "").lower()).strip() for t in texts], dtype=object)
    return pd.util.hash_array(normalized, categorize=False)


def text_concept_file(vocabulary: Mapping[str, str], out_dir: str, task: FileTask) -> int:
    texts = pq.read_table(task.parquet, columns=["text"])["text"].to_pylist()
    return _write({"text_concept": pa.array(text_concepts(texts, vocabulary), pa.string())}, task,
                  output(out_dir, task))


def caption_hashes_file(task: FileTask) -> tuple[int, np.ndarray]:
    """(the file's first pool row, its captions' hashes): caption_repeats counts them over the pool."""
    return task.start, caption_hash(pq.read_table(task.parquet, columns=["text"])["text"].to_pylist())


@functools.lru_cache(maxsize=2)
def _matcher(path: str, stamp: tuple[int, int]):
    return metaclip.build_matcher(metaclip.read_entries(path))


def matcher(entries: str):
    """MetaCLIP's compiled entry list, built once per worker process."""
    stat = os.stat(entries)
    return _matcher(entries, (stat.st_size, stat.st_mtime_ns))


def metaclip_counts_file(entries: str, task: FileTask) -> tuple[np.ndarray, np.ndarray]:
    """The file's matches per entry, sparse: (entries matched, how often)."""
    counts = metaclip.count_shard(pq.read_table(task.parquet, columns=["text"])["text"].to_pylist(), matcher(entries))
    matched = np.flatnonzero(counts)
    return matched, counts[matched]


def metaclip_file(entries: str, counts: str, t: float, seed: int, out_dir: str, task: FileTask) -> int:
    """Keep probabilities from the pool's entry counts, and a uniform draw seeded by the file's place."""
    texts = pq.read_table(task.parquet, columns=["text"])["text"].to_pylist()
    matches = metaclip.match_entries(texts, matcher(entries))
    return _write({"metaclip_keep_probability": pa.array(metaclip.keep_probabilities(matches, loaded(counts), t),
                                                         pa.float32()),
                   "metaclip_draw": pa.array(metaclip.shard_rng(seed, task.index).random(len(texts)), pa.float32())},
                  task, output(out_dir, task))


def columns_file(values: Mapping[str, str], out_dir: str, task: FileTask) -> int:
    """The file's rows of pool-order columns the step reduced (SemDeDup, negCLIPLoss, caption repeats): each an .npy
    of the pool's length."""
    return _write({name: np.asarray(mapped(path)[task.start:task.stop]) for name, path in values.items()}, task,
                  output(out_dir, task))


# ---------------------------------------------------------------- embeddings, per file


def assign_file(scratch: str, key: str, centroids: str, task: FileTask) -> tuple[int, np.ndarray]:
    """(the file's first pool row, the id of each row's nearest centroid by inner product)."""
    return task.start, image_based.assign(mapped(scratch_path(scratch, key, task.stem)), loaded(centroids)).astype(
        np.int32)


def image_cluster_file(scratch: str, key: str, centroids: str, targets: str, out_dir: str, task: FileTask) -> int:
    """image_based: each row's cluster and, where target clusters are given (`targets`: their ids), whether it is one
    of them."""
    clusters = image_based.assign(mapped(scratch_path(scratch, key, task.stem)), loaded(centroids))
    columns = {"image_cluster": clusters}
    if targets:
        columns["in_target_cluster"] = np.isin(clusters, loaded(targets))
    return _write(columns, task, output(out_dir, task))


def normsim_file(scratch: str, key: str, targets: str, out_dir: str, task: FileTask) -> int:
    return _write({"normsim": negclip.normsim(mapped(scratch_path(scratch, key, task.stem)), mapped(targets))}, task,
                  output(out_dir, task))


def vas_file(scratch: str, key: str, sigma: str, out_dir: str, task: FileTask) -> int:
    return _write({"vas_score": vas.vas_scores(mapped(scratch_path(scratch, key, task.stem)), loaded(sigma))}, task,
                  output(out_dir, task))


@functools.lru_cache(maxsize=1)
def _heads(path: str, stamp: tuple[int, int]):
    return hyperbolic.load_heads(path)


def hype_file(scratch: str, keys: tuple[str, str], heads: str, out_dir: str, task: FileTask) -> int:
    stat = os.stat(heads)
    images, texts = (mapped(scratch_path(scratch, key, task.stem)) for key in keys)
    return _write(hyperbolic.hype_scores(_heads(heads, (stat.st_size, stat.st_mtime_ns)), images, texts), task,
                  output(out_dir, task))


def centroid_similarity_file(scratch: str, key: str, clusters: str, centroids: str, task: FileTask
                             ) -> tuple[int, np.ndarray]:
    """Density-based pruning: (the file's first pool row, each row's cosine to its SemDeDup cluster's centroid)."""
    ids = np.asarray(mapped(clusters)[task.start:task.stop])
    return task.start, prototypes.centroid_similarity(mapped(scratch_path(scratch, key, task.stem)), ids,
                                                      loaded(centroids))


# ---------------------------------------------------------------- embeddings, per block of the pool


def semdedup_batch(images: PoolArray, order: str, clusters: str, span: Span) -> tuple[np.ndarray, np.ndarray]:
    """Whole clusters: `order[span]` are their rows (the pool's rows sorted by cluster), `clusters` each row's
    cluster. Returns (the rows, ascending; their SemDeDup scores). Within a cluster, rows keep their pool order, so
    the scores are those of the whole pool's computation."""
    rows = np.sort(np.asarray(mapped(order)[span.start:span.stop]))
    ids = np.asarray(mapped(clusters))[rows]
    return rows, semdedup.semdedup_max_similarity(images[rows], ids)


def negclip_batch(images: PoolArray, texts: PoolArray, orders: str, temperature: float, span: Span
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One batch of one random partition (`orders` % part: its permutation of the pool): (its rows, ascending;
    negCLIPLoss within the batch alone). Averaged over the partitions, these are the pool's negCLIPLoss: the CLIP
    score is the same in each, and the normalisation term is the batch's."""
    rows = np.sort(np.asarray(mapped(orders % span.part)[span.start:span.stop]))
    return rows, negclip.negclip_loss(images[rows], texts[rows], batch_size=len(rows), batches=1,
                                      temperature=temperature)
