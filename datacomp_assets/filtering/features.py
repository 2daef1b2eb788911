"""Per-sample features that filters beyond the metadata need, computed once per pool (no Dagster).

Each method is its own table: `<pool_features>/<method>/<stem>.parquet`, one per metadata file (same stem), uid
and the method's columns, joined to the metadata on uid by the strategies that read them:

| method | column | for | how |
|---|---|---|---|
| text_concept | text_concept | text_based | first caption word naming a class of the vocabulary (ImageNet's, or the tiny analogue's) |
| image_clusters | image_cluster, in_target_cluster | image_based | faiss k-means of the caption-filtered pool's L/14 image embeddings; is the cluster nearest to some target image |
| semdedup | semdedup_max_similarity | SemDeDup | highest cosine to a sample ranked before it in its cluster (k-means of the whole pool) |
| vas | vas_score | VAS | x^T Sigma_target x for the L/14 image embedding x |
| metaclip | metaclip_keep_probability, metaclip_draw | MetaCLIP | 1 - prod(1 - t / max(count_e, t)) over matched entries; a seeded uniform draw |
| negclip | negclip_loss | negCLIPLoss | the L/14 CLIP score minus its contrastive normalisation over random batches (negclip.py) |
| normsim | normsim | NormSim | the L/14 image embedding's largest similarity to a target image (negclip.py) |
| density_pruning | density_pruning_keep | density-based pruning | kept by per-cluster quotas from cluster complexity, after SemDeDup (prototypes.py) |
| caption_repeats | caption_repeats | The Devil Is in the Details | pool captions equal to this one (lowercased, spaces collapsed) |
| hype | hype_score, hype_image_specificity, hype_text_specificity, hype_entailment, ... | HYPE | hyperbolic heads over the L/14 embeddings (hyperbolic.py) |

A method's `_manifest.json` records its files and the versions of its inputs (the metadata's version, the npz
files' sizes and times, the input files', the settings it reads, its code version): a method whose inputs are those
recorded, and whose files are those recorded, is kept; any other is computed again, alone. Only the methods whose
columns are asked for run (and those they read: density pruning reads SemDeDup's clusters).

The per-file and per-block work maps through the engine (`feature_tasks`: this machine's processes or Ray tasks);
the step keeps the reductions: the k-means centroids, the target covariance (VAS), MetaCLIP's entry counts, the
caption-repeat counts, negCLIPLoss's random partitions and the sum of its batches' terms. A model's scores over the
images (the DFN's `dfn_score`) are not here but in the image_scores asset: only they need the downloaded images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.engine import Engine
from datacomp_assets.core.layout import Asset
from datacomp_assets.core.integrity import MANIFEST_FILE, record_table, table_record
from datacomp_assets.core.lineage import manifest_differences
from datacomp_assets.filtering import (
    feature_tasks, hyperbolic, image_based, metaclip, negclip, prototypes, semdedup, vas)
from datacomp_assets.filtering.feature_tasks import (  # caption_hash, text_concepts: re-exported
    FileTask, PoolArray, Span, caption_hash, save_npy, text_concepts)  # noqa: F401

# ---------------------------------------------------------------- text_based


def vocabulary_from_classnames(classnames: Iterable[str]) -> dict[str, str]:
    """Word -> class for single-word class names and their plurals (the part of WordNet's morphy that
    caption words need: "cats" finds "cat")."""
    vocabulary = {}
    for name in classnames:
        word = name.strip().lower()
        if word.isascii() and word.isalpha() and word.islower():
            for form in (word, word + "s", word + "es"):
                vocabulary.setdefault(form, name.strip())
    return vocabulary


# ---------------------------------------------------------------- MetaCLIP


def entries_from_captions(texts: Iterable[str], min_count: int, extra: Iterable[str] = ()) -> list[str]:
    """A MetaCLIP-style metadata list: unigrams and bigrams that occur in at least `min_count` captions of a
    clean source (MetaCLIP: Wikipedia), plus `extra` names (MetaCLIP: WordNet synsets) and "0".."99"."""
    counts: Counter[str] = Counter()
    for text in texts:
        words = metaclip.normalize_caption(text).split()
        counts.update(set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])})
    frequent = sorted(e for e, c in counts.items() if c >= min_count and any(ch.isalnum() for ch in e))
    return sorted({*frequent, *extra, *map(str, range(100))})


# ---------------------------------------------------------------- the pool


# The image-based baseline clusters only the pool whose captions pass this (upstream's
# image_based_clustering.py); its rule in strategies.toml repeats the same caption conditions.
CAPTION_COLUMNS = ("language", "num_tokens", "num_chars")
IMAGE_BASED_CAPTIONS = "language = 'en' AND num_tokens > 1 AND num_chars > 5"
EMBEDDING_KEY = "l14_img"
TEXT_EMBEDDING_KEY = "l14_txt"  # negCLIPLoss and HYPE pair it with the image's

# What this module can write, by what it is computed from: the captions alone, or the metadata's npz embeddings
# (which DataComp's download_upstream.py fetches only with --download_npz). HYPE's columns all start with "hype_".
TEXT_COLUMNS = ("text_concept", "caption_repeats", "metaclip_keep_probability", "metaclip_draw")
EMBEDDING_COLUMNS = ("image_cluster", "in_target_cluster", "normsim", "semdedup_max_similarity",
                     "density_pruning_keep", "vas_score", "negclip_loss")
HYPE_PREFIX = "hype_"


def reads_embeddings(column: str) -> bool:
    return column in EMBEDDING_COLUMNS or reads_hype(column)


def reads_hype(column: str) -> bool:
    return column.startswith(HYPE_PREFIX)


def feature_columns(identifiers: Iterable[str]) -> set[str]:
    """Those of `identifiers` (the words a rule mentions) that are columns written here."""
    return {name for name in identifiers if name in TEXT_COLUMNS or reads_embeddings(name)}


def embedding_readers(strategies: Iterable[str]) -> dict[str, list[str]]:
    """Each of `strategies` whose rule (or a strategy it is built from) reads a column computed from the
    embeddings, with those columns."""
    from datacomp_assets.core.strategies import strategy_identifiers

    readers = {name: sorted(filter(reads_embeddings, feature_columns(strategy_identifiers(name))))
               for name in strategies}
    return {name: columns for name, columns in readers.items() if columns}


def missing_embeddings(readers: Mapping[str, Sequence[str]], lacking: Sequence[Path], files: int,
                       advice: str) -> str:
    """The one line for rules that need embeddings the metadata does not have: the rules, the files, the fix."""
    rules = "; ".join(f"{name} (reads {', '.join(columns)})" for name, columns in readers.items())
    return (f"{rules}: computed from the metadata's embeddings, but {len(lacking)} of the {files} metadata files "
            f"have no .npz beside them (e.g. {lacking[0].with_suffix('.npz')}). {advice}; or choose strategies "
            "that read no embeddings")


def passes_image_based_captions(table: pa.Table) -> np.ndarray:
    """English (fastText), more than 1 fastText token and more than 5 characters."""
    language = np.asarray(table["language"].to_pylist(), dtype=object)
    return ((language == "en") & (table["num_tokens"].to_numpy(zero_copy_only=False) > 1)
            & (table["num_chars"].to_numpy(zero_copy_only=False) > 5))


@dataclass(frozen=True)
class MetadataFile:
    parquet: Path
    rows: slice  # its rows in pool order

    def has_embeddings(self, key: str) -> bool:
        import zipfile

        with zipfile.ZipFile(self.parquet.with_suffix(".npz")) as npz:
            return f"{key}.npy" in npz.namelist()

    def embedding_shape(self, key: str = EMBEDDING_KEY) -> tuple[int, ...]:
        """The shape of one npz array, read from its header (the array itself stays on disk)."""
        import zipfile

        with zipfile.ZipFile(self.parquet.with_suffix(".npz")) as npz, npz.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return read_header(member)[0]

    def embeddings(self, key: str = EMBEDDING_KEY) -> np.ndarray:
        npz = self.parquet.with_suffix(".npz")
        with np.load(npz) as arrays:
            if key not in arrays:
                raise ValueError(f"{npz} has no {key!r} embeddings (keys: {sorted(arrays)})")
            embeddings = arrays[key]
        if len(embeddings) != self.rows.stop - self.rows.start:
            raise ValueError(f"{npz}: {len(embeddings)} embeddings for {self.rows.stop - self.rows.start} metadata rows")
        return embeddings


def metadata_files(metadata_dir: str | os.PathLike, caption_columns: bool = False,
                   embeddings: bool = True) -> list[MetadataFile]:
    """The metadata's parquet files in pool order, each checked for its embeddings (where `embeddings`) and the
    caption columns (where `caption_columns`)."""
    files, start = [], 0
    for path in sorted(Path(metadata_dir).glob("*.parquet")):
        missing = [c for c in CAPTION_COLUMNS if caption_columns and c not in pq.read_schema(path).names]
        if missing:
            raise ValueError(f"{path} lacks the caption features {missing}: pool_features needs them "
                             "(materialize pool_metadata again)")
        if embeddings and not path.with_suffix(".npz").exists():
            raise FileNotFoundError(
                f"{path.with_suffix('.npz')} is missing: pool_features needs the metadata's embeddings (at a "
                "published scale: the npz files beside the parquet files in the mirror, or the published "
                "resource's include_npz to fetch them from the Hub)")
        rows = pq.read_metadata(path).num_rows
        files.append(MetadataFile(path, slice(start, start + rows)))
        start += rows
    if not files:
        raise FileNotFoundError(f"no metadata parquet in {metadata_dir}; materialize pool_metadata first")
    return files


@dataclass(frozen=True)
class FeatureSettings:
    vocabulary: Mapping[str, str]           # caption word -> class (text_based)
    metaclip_entries: Sequence[str] | None  # None: no MetaCLIP columns
    metaclip_t: float
    clusters: int                           # k-means clusters (image_based, SemDeDup)
    seed: int = 0
    kmeans_max_points: int | None = None    # k-means trains on a seeded sample of at most this many rows
    negclip_batch_size: int = 32_768        # negCLIPLoss's random batches (the reference's), at most a tenth of the pool
    density_pruning_fraction: float = 0.30  # the share of the pool density-based pruning keeps
    density_pruning_semdedup: float = 0.995  # SemDeDup's threshold before it (the SemDeDup strategy's)
    columns: frozenset[str] | None = None   # the columns to compute (and those their computation needs); None: all

    def wants(self, *names: str) -> bool:
        return self.columns is None or any(name in self.columns for name in names)

    def wants_hype(self) -> bool:
        return self.columns is None or any(map(reads_hype, self.columns))

    def wants_image_clusters(self) -> bool:
        """image_based's k-means, over the rows whose captions pass its terms (so fastText runs only for it)."""
        return self.wants("image_cluster", "in_target_cluster")

    def wants_embeddings(self) -> bool:
        return self.columns is None or any(map(reads_embeddings, self.columns))


# ---------------------------------------------------------------- the methods


HYPE_COLUMNS = ("hype_score", "hype_image_specificity", "hype_text_specificity", "hype_entailment", "hype_distance",
                "hype_image_origin_distance", "hype_text_origin_distance")


@dataclass(frozen=True)
class Method:
    name: str                     # its folder under pool_features
    columns: tuple[str, ...]
    embeddings: bool = False      # reads the npz
    needs: tuple[str, ...] = ()   # methods whose results it reads
    kernels: tuple = ()           # the modules that compute it: their source is part of its code version
    version: str = "1"            # bumped when what this module does for it changes its values


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("text_concept", ("text_concept",)),
    Method("caption_repeats", ("caption_repeats",)),
    Method("metaclip", ("metaclip_keep_probability", "metaclip_draw"), kernels=(metaclip,)),
    Method("image_clusters", ("image_cluster", "in_target_cluster"), True, kernels=(image_based,)),
    Method("normsim", ("normsim",), True, kernels=(negclip,)),
    Method("semdedup", ("semdedup_max_similarity",), True, kernels=(image_based, semdedup)),
    Method("density_pruning", ("density_pruning_keep",), True, needs=("semdedup",), kernels=(prototypes,)),
    Method("vas", ("vas_score",), True, kernels=(vas,)),
    Method("negclip", ("negclip_loss",), True, kernels=(negclip,)),
    Method("hype", HYPE_COLUMNS, True, kernels=(hyperbolic,)),
)}
SEMDEDUP_CENTROIDS, SEMDEDUP_CLUSTERS = "_centroids.npy", "_clusters.npy"  # beside SemDeDup's tables, for DBP
METADATA_VERSION = "metadata_version"  # a method's record: the metadata version its values are of


def method_of(column: str) -> str | None:
    return next((m.name for m in METHODS.values() if column in m.columns), None)


def methods_for(columns: Iterable[str] | None) -> list[str]:
    """The methods that compute `columns` (None: every method), and those they read, in the order they run."""
    if columns is None:
        return list(METHODS)
    wanted = {name for name in map(method_of, columns) if name}
    for name in list(wanted):
        wanted.update(METHODS[name].needs)
    return [name for name in METHODS if name in wanted]


def method_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The methods' folders under a pool_features folder, recorded or not."""
    out_dir = Path(out_dir)
    return [out_dir / name for name in METHODS if (out_dir / name).is_dir()]


def read_features(out_dir: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Every recorded method's columns (or `columns`), joined on uid, in the first method's row order: for tests and
    notebooks (the rules join them in DuckDB)."""
    tables = []
    for directory in method_dirs(out_dir):
        if "manifest" not in table_record(directory):
            continue
        table = pq.read_table(sorted(directory.glob("*.parquet")))
        keep = [c for c in table.column_names if c != "uid" and (columns is None or c in columns)]
        if keep:
            tables.append(table.select(["uid", *keep]))
    if not tables:
        raise FileNotFoundError(f"no recorded pool_features method under {out_dir}")
    joined = tables[0]
    for table in tables[1:]:
        joined = joined.join(table, "uid", join_type="left outer")
    order = pa.table({"uid": tables[0]["uid"], "_row": pa.array(np.arange(len(tables[0])))})
    return joined.join(order, "uid").sort_by("_row").drop(["_row"])


def _code_version(method: Method) -> str:
    digest = hashlib.sha256(method.version.encode())
    for module in method.kernels:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _stats(paths: Iterable[Path]) -> str:
    """A digest of files' names, sizes and modification times (what a rewritten file changes)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


class ArrayInput:
    """An input array of a method (targets, VAS's targets): a user's .npy file (versioned by its size and time, read
    memory-mapped by the tasks) or an array in memory (versioned by its bytes, written to the scratch when used)."""

    def __init__(self, name: str, value: np.ndarray | str | os.PathLike | None):
        self.name, self.value = name, value
        if value is None:
            self.version = None
        elif isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            self.version = hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()[:16]
        else:
            self.version = _stats([Path(value)])

    def __bool__(self) -> bool:
        return self.value is not None

    def path(self, scratch: Path) -> str:
        if isinstance(self.value, np.ndarray):
            target = scratch / "inputs" / f"{self.name}.npy"
            if not target.exists():
                save_npy(self.value, target)
            return str(target)
        try:
            np.load(self.value, mmap_mode="r", allow_pickle=False)
            return str(self.value)
        except ValueError:  # not a plain .npy: loaded once, written to the scratch for the tasks
            target = scratch / "inputs" / f"{self.name}.npy"
            save_npy(np.load(self.value, allow_pickle=False), target)
            return str(target)


# ---------------------------------------------------------------- the step


def compute_pool_features(metadata_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: FeatureSettings,
                          target_embeddings: np.ndarray | str | os.PathLike | None,
                          vas_targets: np.ndarray | str | os.PathLike | None,
                          log: Callable[[str], None] = print, hype_heads: Path | None = None,
                          captioned: np.ndarray | Callable[[], np.ndarray] | None = None,
                          engine: Engine | None = None, processes: int = 1,
                          metadata_version: str | None = None) -> dict:
    """Write `<out_dir>/<method>/<stem>.parquet` (uid + the method's columns) for every metadata file and every
    method asked for whose inputs are given, each recorded with its inputs' versions; keep those already computed
    from the same inputs.

    Only the methods of the columns `settings.columns` names run (all, when None); the npz files are read only when
    a method that reads them runs: they are copied once into per-file float16 scratch files (removed at the end)
    that the tasks read in blocks. Memory holds the k-means sample and a few numbers per row, never the pool's
    embeddings. `target_embeddings`: L/14 image embeddings of ImageNet's training images (or the tiny analogue's), an
    array or an .npy file; None leaves `in_target_cluster` and `normsim` out. `vas_targets`: VAS's, the same; None
    leaves `vas_score` out. `settings.metaclip_entries` None leaves MetaCLIP out; `hype_heads` None HYPE; metadata
    without L/14 text embeddings leaves negCLIPLoss and HYPE out. `captioned`: per pool row, whether its caption
    passes IMAGE_BASED_CAPTIONS, or a function that computes it (called only when image_based's clusters are
    computed); None reads them from the metadata. `engine`, `processes`: where the tasks run (this machine's
    `processes` processes by default). `metadata_version`: the metadata's version (pool_metadata's), recorded with
    each method; None: a digest of the parquet files' sizes and times.
    """
    run = _Run(Path(metadata_dir), Path(out_dir), settings, ArrayInput("target_embeddings", target_embeddings),
               ArrayInput("vas_targets", vas_targets), hype_heads, captioned, log, metadata_version)
    with (engine or Engine()).session(processes, Asset.POOL_FEATURES) as session:
        run.session = session
        return run.compute()


class _Run:
    def __init__(self, metadata_dir: Path, out_dir: Path, settings: FeatureSettings, targets: ArrayInput,
                 vas_targets: ArrayInput, hype_heads: Path | None, captioned, log, metadata_version: str | None):
        self.metadata_dir, self.out_dir, self.settings, self.log = metadata_dir, out_dir, settings, log
        self.targets, self.vas_targets, self.hype_heads, self.captioned_given = targets, vas_targets, hype_heads, \
            captioned
        self.files = metadata_files(metadata_dir, embeddings=False)
        self.n = self.files[-1].rows.stop
        self.tasks = [FileTask(str(f.parquet), f.rows.start, f.rows.stop, i) for i, f in enumerate(self.files)]
        self.metadata_version = metadata_version or _stats([f.parquet for f in self.files])
        self.scratch = out_dir / ".scratch"
        self.copied: set[str] = set()
        self.widths: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.session = None

    # ------------------------------------------------ which methods, and whether each is kept

    def has_npz(self) -> bool:
        return all(f.parquet.with_suffix(".npz").exists() for f in self.files)

    def has_text_embeddings(self) -> bool:
        return self.has_npz() and all(f.has_embeddings(TEXT_EMBEDDING_KEY) for f in self.files)

    def available(self, name: str) -> bool:
        """Whether the method's inputs are given (a method asked for without them is left out, as before)."""
        s = self.settings
        return {"metaclip": bool(s.metaclip_entries), "normsim": bool(self.targets), "vas": bool(self.vas_targets),
                "negclip": self.text_embeddings, "hype": self.text_embeddings and self.hype_heads is not None
                }.get(name, True)

    def inputs(self, name: str) -> dict:
        """What the method's values depend on; recorded with it, and compared on the next run."""
        s, method = self.settings, METHODS[name]
        inputs = {"code": _code_version(method), METADATA_VERSION: self.metadata_version}
        if method.embeddings:
            inputs["npz"] = self.npz_version
        inputs.update({
            "text_concept": lambda: {"vocabulary": _digest(sorted(s.vocabulary.items()))},
            "caption_repeats": lambda: {},
            "metaclip": lambda: {"entries": _digest(list(s.metaclip_entries)), "t": s.metaclip_t, "seed": s.seed},
            "image_clusters": lambda: {"clusters": s.clusters, "seed": s.seed, "kmeans_max_points": s.kmeans_max_points,
                                       "captions": IMAGE_BASED_CAPTIONS, "targets": self.targets.version},
            "normsim": lambda: {"targets": self.targets.version},
            "semdedup": lambda: {"clusters": s.clusters, "seed": s.seed, "kmeans_max_points": s.kmeans_max_points},
            "density_pruning": lambda: {"fraction": s.density_pruning_fraction,
                                        "semdedup_threshold": s.density_pruning_semdedup},
            "vas": lambda: {"vas_targets": self.vas_targets.version},
            "negclip": lambda: {"batch_size": self.negclip_batch_size(), "batches": negclip.DEFAULT_BATCHES,
                                "temperature": negclip.DEFAULT_TEMPERATURE, "seed": s.seed},
            "hype": lambda: {"heads": _stats([Path(self.hype_heads)])},
        }[name]())
        for need in method.needs:
            inputs[need] = self.keys[need]
        return inputs

    def negclip_batch_size(self) -> int:
        # A batch is at most a tenth of the pool, so the ten batchings differ (at tiny, 2,000 of 20,000 rows).
        return max(1, min(self.settings.negclip_batch_size, self.n // 10))

    def reason_to_compute(self, name: str, inputs: dict) -> str | None:
        """None when the method's recorded files are its present ones and were computed from `inputs`."""
        directory = self.out_dir / name
        try:
            record = table_record(directory)
        except ValueError:
            return "its record is unreadable"
        if "manifest" not in record:
            return "not computed yet"
        changed = sorted(k for k in {*inputs, *record.get("inputs", {})} if record.get("inputs", {}).get(k)
                         != inputs.get(k))
        if changed:
            return f"its inputs changed ({', '.join(changed)})"
        manifest = record["manifest"]
        if set(manifest) != {f.parquet.name for f in self.files}:
            return "its files are not the pool's"
        problems = manifest_differences(directory, manifest, "*.parquet")
        if name == "semdedup" and not all((directory / f).exists() for f in (SEMDEDUP_CENTROIDS, SEMDEDUP_CLUSTERS)):
            problems.append("its clusters are missing")
        return "; ".join(problems[:3]) if problems else None

    # ------------------------------------------------ the run

    def compute(self) -> dict:
        s = self.settings
        asked = methods_for(None if s.columns is None else s.columns)
        if "image_clusters" in asked and self.captioned_given is None:
            metadata_files(self.metadata_dir, caption_columns=True, embeddings=False)  # named before anything runs
        embedded = any(METHODS[m].embeddings for m in asked)
        if embedded and not self.has_npz():
            lacking = next(f.parquet.with_suffix(".npz") for f in self.files
                           if not f.parquet.with_suffix(".npz").exists())
            raise FileNotFoundError(
                f"{lacking} is missing: pool_features needs the metadata's embeddings (at a published scale: the npz "
                "files beside the parquet files in the mirror, or the published resource's include_npz to fetch "
                "them from the Hub)")
        self.text_embeddings = embedded and any(m in asked for m in ("negclip", "hype")) and self.has_text_embeddings()
        self.npz_version = _stats([f.parquet.with_suffix(".npz").resolve() for f in self.files]) if embedded else None
        chosen = [m for m in asked if self.available(m)]
        self._remove_stale_layout(chosen)
        self.keys, todo, kept = {}, [], []
        for name in chosen:
            inputs = self.inputs(name)
            self.keys[name] = _digest(inputs)
            reason = self.reason_to_compute(name, inputs)
            (todo.append((name, inputs, reason)) if reason else kept.append(name))
        self.log(f"pool_features: {self.n:,} samples in {len(self.files)} files; "
                 + (f"kept {', '.join(kept)} (inputs and files as recorded); " if kept else "")
                 + (f"computing {'; '.join(f'{n} ({r})' for n, _, r in todo)}" if todo else "nothing to compute"))
        summaries = {}
        try:
            for name, inputs, _ in todo:
                start = time.perf_counter()
                directory = self.out_dir / name
                directory.mkdir(parents=True, exist_ok=True)
                (directory / MANIFEST_FILE).unlink(missing_ok=True)  # until recorded again, nothing reads it
                summary = getattr(self, f"_{name}")(directory) or {}
                names = {f.parquet.name for f in self.files}
                for stale in directory.glob("*.parquet"):
                    if stale.name not in names:
                        stale.unlink()  # the features of a metadata file no longer in the pool, which a rule would join
                record_table(directory, [directory / n for n in sorted(names)],
                             {"method": name, "inputs": inputs, "inputs_key": self.keys[name],
                              METADATA_VERSION: self.metadata_version, "summary": summary})
                seconds = round(time.perf_counter() - start, 2)
                summaries[name] = summary
                self.seconds[f"{name}_method_seconds"] = seconds
                self.log(f"pool_features: {name} computed in {seconds:.1f} s")
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for name in kept:
            summaries[name] = table_record(self.out_dir / name).get("summary", {})
        columns = [c for name in chosen for c in pq.read_schema(next((self.out_dir / name).glob("*.parquet"))).names
                   if c != "uid"]
        image, meta = summaries.get("image_clusters", {}), summaries.get("metaclip", {})
        return {"rows": self.n, "files": len(self.files),
                "methods_computed": ", ".join(n for n, _, _ in todo) or "none",
                "methods_kept": ", ".join(kept) or "none", "columns": ", ".join(columns),
                "clusters": s.clusters if any(m in chosen for m in ("image_clusters", "semdedup")) else 0,
                "target_clusters": image.get("target_clusters", 0),
                "metaclip_entries": meta.get("entries", 0), "metaclip_entries_matched": meta.get("entries_matched", 0),
                "metaclip_t": s.metaclip_t, **self.seconds}

    def _remove_stale_layout(self, chosen: list[str]) -> None:
        """The single-folder layout of before (one table of every column), and methods of another pool: a rule must
        never join them."""
        old = [p for p in self.out_dir.glob("*.parquet")] + [p for p in [self.out_dir / MANIFEST_FILE] if p.exists()]
        if old:
            self.log(f"pool_features: removing {len(old)} files of the single-folder layout of before in "
                     f"{self.out_dir}")
            for path in old:
                path.unlink()
        for directory in method_dirs(self.out_dir):
            try:
                version = table_record(directory).get(METADATA_VERSION)
            except ValueError:
                version = None
            if directory.name not in chosen and version != self.metadata_version:
                self.log(f"pool_features: removing {directory.name}, computed from other metadata")
                shutil.rmtree(directory)

    # ------------------------------------------------ helpers of the methods

    def map(self, work, tasks, what: str) -> Iterator:
        start = time.perf_counter()
        yield from self.session.map_unordered(work, tasks, f"pool_features ({what})")
        self.seconds[f"{what}_seconds"] = round(self.seconds.get(f"{what}_seconds", 0)
                                               + time.perf_counter() - start, 2)

    def write(self, work, what: str) -> int:
        return sum(self.map(work, self.tasks, what))

    def embeddings(self, key: str = EMBEDDING_KEY) -> PoolArray:
        """The scratch copies of one npz key (made by one task per file, the first time a method asks)."""
        if key not in self.copied:
            width = self.files[0].embedding_shape(key)[1]
            for _ in self.map(partial(feature_tasks.copy_embeddings, (key,), str(self.scratch)), self.tasks, "read"):
                pass
            self.copied.add(key)
            self.widths[key] = width
        return PoolArray(tuple(str(feature_tasks.scratch_path(str(self.scratch), key, f.parquet.stem))
                               for f in self.files), (*(f.rows.start for f in self.files), self.n), self.widths[key])

    def blocks(self, images: PoolArray, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """The pool's embeddings file by file (k-means reads them in the step: its sample is the reduction)."""
        for path, start, stop in zip(images.paths, images.starts, images.starts[1:]):
            block = np.asarray(feature_tasks.mapped(path))
            yield block if rows is None else block[rows[start:stop]]

    def kmeans(self, blocks) -> np.ndarray:
        return image_based.train_centroids(blocks, self.settings.clusters, seed=self.settings.seed,
                                           max_points=self.settings.kmeans_max_points)

    def save(self, array: np.ndarray, name: str) -> str:
        path = self.scratch / name
        save_npy(array, path)
        return str(path)

    def by_file(self, results, dtype) -> np.ndarray:
        """Per-file results (first pool row, values) in pool order."""
        out = np.empty(self.n, dtype=dtype)
        for start, values in results:
            out[start:start + len(values)] = values
        return out

    def write_columns(self, directory: Path, columns: Mapping[str, np.ndarray], what: str) -> None:
        paths = {name: self.save(values, f"{directory.name}/{name}.npy") for name, values in columns.items()}
        self.write(partial(feature_tasks.columns_file, paths, str(directory)), f"{what}_write")

    def captioned(self) -> np.ndarray:
        given = self.captioned_given
        if given is None:
            files = metadata_files(self.metadata_dir, caption_columns=True, embeddings=False)
            return np.concatenate([passes_image_based_captions(pq.read_table(f.parquet, columns=list(CAPTION_COLUMNS)))
                                   for f in files])
        captioned = np.asarray(given() if callable(given) else given, dtype=bool)
        if len(captioned) != self.n:
            raise ValueError(f"captioned: {len(captioned)} rows for a pool of {self.n}")
        return captioned

    # ------------------------------------------------ the methods (each writes its folder, returns its summary)

    def _text_concept(self, directory: Path) -> dict:
        self.write(partial(feature_tasks.text_concept_file, dict(self.settings.vocabulary), str(directory)),
                   "text_concept")
        return {"vocabulary": len(self.settings.vocabulary)}

    def _caption_repeats(self, directory: Path) -> dict:
        hashes = self.by_file(self.map(feature_tasks.caption_hashes_file, self.tasks, "caption_hashes"), np.uint64)
        self.write_columns(directory, {"caption_repeats": repeats(hashes)}, "caption_repeats")
        return {}

    def _metaclip(self, directory: Path) -> dict:
        entries = self.scratch / "metaclip" / "entries.json"
        entries.parent.mkdir(parents=True, exist_ok=True)
        entries.write_text(json.dumps(list(self.settings.metaclip_entries)))
        counts = np.zeros(len(feature_tasks.matcher(str(entries)).entries), dtype=np.int64)
        for matched, n in self.map(partial(feature_tasks.metaclip_counts_file, str(entries)), self.tasks,
                                   "metaclip_counts"):
            counts[matched] += n
        counts_path = self.save(counts, "metaclip/counts.npy")
        self.write(partial(feature_tasks.metaclip_file, str(entries), counts_path, self.settings.metaclip_t,
                           self.settings.seed, str(directory)), "metaclip")
        return {"entries": len(counts), "entries_matched": int((counts > 0).sum())}

    def _image_clusters(self, directory: Path) -> dict:
        # image_based: centroids of the caption-filtered pool, as upstream; every sample gets its nearest one.
        images = self.embeddings()
        captioned = self.captioned()
        self.log(f"pool_features: image_based's k-means into {self.settings.clusters:,} clusters on at most "
                 f"{min(int(captioned.sum()), self.settings.kmeans_max_points or self.n):,} of the "
                 f"{int(captioned.sum()):,} rows whose captions pass its terms")
        start = time.perf_counter()
        centroids = self.kmeans(self.blocks(images, captioned))
        self.seconds["image_kmeans_seconds"] = round(time.perf_counter() - start, 2)
        centroids_path = self.save(centroids, "image_clusters/centroids.npy")
        targets_path, targets = "", np.empty(0, np.int64)
        if self.targets:
            targets = image_based.target_clusters(feature_tasks.mapped(self.targets.path(self.scratch)), centroids)
            targets_path = self.save(targets, "image_clusters/targets.npy")
        self.write(partial(feature_tasks.image_cluster_file, str(self.scratch), EMBEDDING_KEY, centroids_path,
                           targets_path, str(directory)), "image_assign")
        return {"clusters": len(centroids), "target_clusters": len(targets)}

    def _normsim(self, directory: Path) -> dict:
        self.embeddings()
        self.write(partial(feature_tasks.normsim_file, str(self.scratch), EMBEDDING_KEY,
                           self.targets.path(self.scratch), str(directory)), "normsim")
        return {}

    def _semdedup(self, directory: Path) -> dict:
        # SemDeDup: its own clustering of the whole pool (it deduplicates within clusters, captions aside).
        images = self.embeddings()
        start = time.perf_counter()
        centroids = self.kmeans(self.blocks(images))
        self.seconds["semdedup_kmeans_seconds"] = round(time.perf_counter() - start, 2)
        centroids_path = self.save(centroids, "semdedup/centroids.npy")
        clusters = self.by_file(self.map(partial(feature_tasks.assign_file, str(self.scratch), EMBEDDING_KEY,
                                                 centroids_path), self.tasks, "semdedup_assign"), np.int32)
        clusters_path = self.save(clusters, "semdedup/clusters.npy")
        order = np.argsort(clusters, kind="stable")
        order_path = self.save(order, "semdedup/order.npy")
        # one task per batch of whole clusters, of at most semdedup's chunk of rows (a bigger cluster alone)
        ends = np.unique(np.cumsum(np.bincount(clusters, minlength=len(centroids))))
        ends, spans, first = ends[ends > 0], [], 0
        while first < self.n:
            i = int(np.searchsorted(ends, first + semdedup.DEFAULT_CHUNK, side="right")) - 1
            last = int(ends[i]) if i >= 0 and ends[i] > first else int(ends[np.searchsorted(ends, first, "right")])
            spans.append(Span(first, last))
            first = last
        scores = np.empty(self.n, dtype=np.float32)
        for rows, values in self.map(partial(feature_tasks.semdedup_batch, images, order_path, clusters_path), spans,
                                     "semdedup"):
            scores[rows] = values
        del order
        self.write_columns(directory, {"semdedup_max_similarity": scores}, "semdedup")
        save_npy(centroids, directory / SEMDEDUP_CENTROIDS)  # density-based pruning reads the same clusters
        save_npy(clusters, directory / SEMDEDUP_CLUSTERS)
        return {"clusters": len(centroids), "cluster_batches": len(spans)}

    def _density_pruning(self, directory: Path) -> dict:
        # Density-based pruning: per-cluster quotas over SemDeDup's clusters, among its survivors (all of them when
        # fewer survive than the target).
        self.embeddings()
        semdedup_dir = self.out_dir / "semdedup"
        centroids = np.load(semdedup_dir / SEMDEDUP_CENTROIDS)
        clusters_path = str(semdedup_dir / SEMDEDUP_CLUSTERS)
        similarity = self.by_file(self.map(partial(
            feature_tasks.centroid_similarity_file, str(self.scratch), EMBEDDING_KEY, clusters_path,
            str(semdedup_dir / SEMDEDUP_CENTROIDS)), self.tasks, "density_similarity"), np.float32)
        scores = np.concatenate([pq.read_table(semdedup_dir / f.parquet.name, columns=["semdedup_max_similarity"])
                                 .column(0).to_numpy() for f in self.files])
        eligible = scores <= self.settings.density_pruning_semdedup
        target = min(int(eligible.sum()), round(self.settings.density_pruning_fraction * self.n))
        keep = density_keep(similarity, np.load(clusters_path), eligible, centroids, target)
        self.write_columns(directory, {"density_pruning_keep": keep}, "density_pruning")
        return {"kept": int(keep.sum())}

    def _vas(self, directory: Path) -> dict:
        self.embeddings()
        sigma = self.save(vas.target_covariance(feature_tasks.mapped(self.vas_targets.path(self.scratch))),
                          "vas/sigma.npy")
        self.write(partial(feature_tasks.vas_file, str(self.scratch), EMBEDDING_KEY, sigma, str(directory)), "vas")
        return {}

    def _negclip(self, directory: Path) -> dict:
        """The pool's random partitions are drawn here (as negclip.negclip_loss draws them), each batch is one task,
        and the batches' values are averaged over the partitions in fixed point, so that the sum does not depend on
        the order in which the tasks finish."""
        images, texts = self.embeddings(), self.embeddings(TEXT_EMBEDDING_KEY)
        batch_size, partitions = self.negclip_batch_size(), negclip.DEFAULT_BATCHES
        rng, n_batches = np.random.default_rng(self.settings.seed), math.ceil(self.n / batch_size)
        spans = []
        for k in range(partitions):
            self.save(rng.permutation(self.n), f"negclip/order_{k}.npy")
            # np.array_split's batches: the first n % n_batches one row longer
            sizes = [self.n // n_batches + 1] * (self.n % n_batches) + [self.n // n_batches] * (n_batches
                                                                                            - self.n % n_batches)
            bounds = np.cumsum([0, *sizes])
            spans += [Span(int(a), int(b), k) for a, b in zip(bounds, bounds[1:])]
        total = np.zeros(self.n, dtype=np.int64)
        for rows, values in self.map(partial(feature_tasks.negclip_batch, images, texts,
                                             str(self.scratch / "negclip" / "order_%d.npy"),
                                             negclip.DEFAULT_TEMPERATURE), spans, "negclip"):
            total[rows] += np.rint(values.astype(np.float64) * FIXED_POINT).astype(np.int64)
        loss = (total / (FIXED_POINT * partitions)).astype(np.float32)
        self.write_columns(directory, {"negclip_loss": loss}, "negclip")
        return {"batch_size": batch_size, "batches": len(spans)}

    def _hype(self, directory: Path) -> dict:
        self.embeddings(), self.embeddings(TEXT_EMBEDDING_KEY)
        self.write(partial(feature_tasks.hype_file, str(self.scratch), (EMBEDDING_KEY, TEXT_EMBEDDING_KEY),
                           str(self.hype_heads), str(directory)), "hype")
        return {}


FIXED_POINT = 2.0 ** 32  # negCLIPLoss's per-batch values summed as integers: exact, in any order


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def density_keep(similarity: np.ndarray, clusters: np.ndarray, eligible: np.ndarray, centroids: np.ndarray,
                 target: int) -> np.ndarray:
    """prototypes.density_based_pruning's selection from the rows' cosines to their centroids (computed per file by
    the tasks): per-cluster quotas from complexity, then each cluster's hardest eligible rows."""
    k = len(centroids)
    complexity = (prototypes.intra_cluster_distance(similarity, clusters, eligible, k)
                  * prototypes.inter_cluster_distance(centroids, prototypes.DEFAULT_NEIGHBORS))
    capacity = np.bincount(clusters[eligible], minlength=k).astype(np.int64)
    quotas, _ = prototypes.cluster_quotas(complexity, capacity, target, prototypes.DEFAULT_TEMPERATURE,
                                          prototypes.DEFAULT_BALANCE)
    # hardest first: eligible rows by cluster, then similarity to the centroid ascending, then row index
    rows = np.flatnonzero(eligible)
    order = np.lexsort((rows, similarity[rows], clusters[rows]))
    ranked_rows, ranked_clusters = rows[order], clusters[rows][order]
    rank = np.arange(ranked_rows.size) - np.searchsorted(ranked_clusters, ranked_clusters, side="left")
    keep = np.zeros(len(clusters), dtype=bool)
    keep[ranked_rows[rank < quotas[ranked_clusters]]] = True
    return keep


def repeats(hashes: np.ndarray) -> np.ndarray:
    """For each row, how many rows of the pool share its hash (itself included)."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.int64)

