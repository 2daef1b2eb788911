"""Per-sample features that filters beyond the metadata need, computed once per pool (no Dagster).

One parquet per metadata shard (same stem), keyed by uid, joined to the metadata by the strategies:

| column | for | how |
|---|---|---|
| text_concept | text_based | first caption word naming a class of the vocabulary (ImageNet's, or the tiny analogue's) |
| image_cluster, in_target_cluster | image_based | faiss k-means of the caption-filtered pool's L/14 image embeddings; is the cluster nearest to some target image |
| semdedup_max_similarity | SemDeDup | highest cosine to a sample ranked before it in its cluster (k-means of the whole pool) |
| vas_score | VAS | x^T Sigma_target x for the L/14 image embedding x |
| metaclip_keep_probability, metaclip_draw | MetaCLIP | 1 - prod(1 - t / max(count_e, t)) over matched entries; a seeded uniform draw |
| negclip_loss | negCLIPLoss | the L/14 CLIP score minus its contrastive normalisation over random batches (negclip.py) |
| normsim | NormSim | the L/14 image embedding's largest similarity to a target image (negclip.py) |
| density_pruning_keep | density-based pruning | kept by per-cluster quotas from cluster complexity, after SemDeDup (prototypes.py) |
| caption_repeats | The Devil Is in the Details | pool captions equal to this one (lowercased, spaces collapsed) |
| hype_score, hype_image_specificity, hype_text_specificity, hype_entailment | HYPE | hyperbolic heads over the L/14 embeddings (hyperbolic.py) |

Counts (MetaCLIP, caption repeats), centroids (k-means), the target covariance (VAS) and negCLIPLoss's random
batches need the whole pool: they are reduced once over all files, then every file is mapped with them. A model's scores over the images (the DFN's
`dfn_score`) are not here but in the image_scores asset: only they need the downloaded images.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import write_parquet_atomically
from datacomp_assets.core.integrity import record_table, require_valid
from datacomp_assets.filtering import hyperbolic, image_based, metaclip, negclip, prototypes, semdedup, vas

_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------- text_based


def vocabulary_from_classnames(classnames: Iterable[str]) -> dict[str, str]:
    """Word -> class for single-word class names and their plurals (the part of WordNet's morphy that
    caption words need: "cats" finds "cat")."""
    vocabulary = {}
    for name in classnames:
        word = name.strip().lower()
        if _WORD.fullmatch(word):
            for form in (word, word + "s", word + "es"):
                vocabulary.setdefault(form, name.strip())
    return vocabulary


def text_concepts(texts: Sequence[str], vocabulary: Mapping[str, str]) -> list[str | None]:
    """The class named by the first caption word found in the vocabulary, or None."""
    out = []
    for text in texts:
        out.append(next((vocabulary[w] for w in _WORD.findall((text or "").lower()) if w in vocabulary), None))
    return out


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


def compute_pool_features(metadata_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: FeatureSettings,
                          target_embeddings: np.ndarray | None, vas_targets: np.ndarray | None,
                          log: Callable[[str], None] = print, hype_heads: Path | None = None,
                          captioned: np.ndarray | None = None) -> dict:
    """Write `<out_dir>/<stem>.parquet` (uid + the feature columns) for every metadata file.

    Only the columns `settings.columns` names are computed (all, when None); the npz files are read only when one
    of them `reads_embeddings`, and the caption filter only for image_based's clusters. Streamed in bounded
    memory: the L/14 embeddings are copied once into float16 scratch files (removed at the end) that k-means
    sampling, cluster assignment, SemDeDup, VAS, negCLIPLoss and HYPE read in blocks, and captions are read a file
    at a time; memory holds the k-means sample and a few numbers per row, not the pool's embeddings.
    `target_embeddings`: L/14 image embeddings of ImageNet's training images (or the tiny analogue's); None leaves
    `in_target_cluster` and `normsim` out. `vas_targets`: VAS's target embeddings; None leaves `vas_score` out.
    `settings.metaclip_entries` None leaves the MetaCLIP columns out; `hype_heads` None the HYPE columns; metadata
    without L/14 text embeddings leaves negCLIPLoss and HYPE out. `captioned`: per pool row, whether its caption
    passes IMAGE_BASED_CAPTIONS (`selection.rows_where`, which computes the caption features a published pool
    lacks); None reads them from the metadata.
    """
    clustered, embedded = settings.wants_image_clusters(), settings.wants_embeddings()
    given = captioned is not None
    files = metadata_files(metadata_dir, caption_columns=clustered and not given, embeddings=embedded)
    n = files[-1].rows.stop
    if given and len(captioned) != n:
        raise ValueError(f"captioned: {len(captioned)} rows for a pool of {n}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:  # per-phase timings, for the benchmarks and the UI
        nonlocal clock
        seconds[f"{phase}_seconds"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    out_dir = Path(out_dir)
    scratch = out_dir / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        keys = ([EMBEDDING_KEY] + ([TEXT_EMBEDDING_KEY] if all(f.has_embeddings(TEXT_EMBEDDING_KEY) for f in files)
                                   else [])) if embedded else []
        scratch_files = {key: _scratch_file(scratch / f"{key}.npy", n, files[0].embedding_shape(key)[1])
                         for key in keys}
        read_captions = clustered and not given
        captioned = np.array(captioned, dtype=bool) if given else np.zeros(n, dtype=bool)
        repeated = settings.wants("caption_repeats")
        caption_hashes = np.zeros(n if repeated else 0, dtype=np.uint64)
        matcher = (metaclip.build_matcher(settings.metaclip_entries)
                   if settings.metaclip_entries and settings.wants("metaclip_keep_probability", "metaclip_draw")
                   else None)
        counts = np.zeros(len(matcher.entries) if matcher else 0, dtype=np.int64)
        # Pass 1: embeddings to scratch (plain writes: a memory map would keep every written page resident), the
        # caption filter, caption hashes, MetaCLIP's entry counts.
        for file in files:
            table = pq.read_table(file.parquet, columns=["text", *(CAPTION_COLUMNS if read_captions else [])])
            for key, (path, offset, width) in scratch_files.items():
                with open(path, "r+b") as writer:
                    writer.seek(offset + file.rows.start * width * 2)
                    writer.write(np.ascontiguousarray(file.embeddings(key), dtype=np.float16).tobytes())
            if read_captions:
                captioned[file.rows] = passes_image_based_captions(table)
            if repeated:
                caption_hashes[file.rows] = caption_hash(table["text"].to_pylist())
            if matcher:
                counts += metaclip.count_shard(table["text"].to_pylist(), matcher)
        embeddings = {key: ScratchArray(path) for key, (path, _, _) in scratch_files.items()}
        lap("read")
        log(f"pool_features: {n:,} samples in {len(files)} files"
            + (f" ({int(captioned.sum()):,} pass the image-based caption filter); k-means into {settings.clusters:,} "
               f"clusters on at most {min(n, settings.kmeans_max_points or n):,} rows" if clustered else "")
            + ("" if embedded else "; no column computed from the embeddings is asked for: the npz files are not read"))
        columns, target_clusters = (_pool_columns(embeddings, captioned, settings, target_embeddings, vas_targets,
                                                  hype_heads, lap) if embedded else ({}, 0))
        if repeated:
            columns["caption_repeats"] = repeats(caption_hashes)
        concepts = settings.wants("text_concept")
        for i, file in enumerate(files):  # pass 2: per-file columns, written beside the pool-wide ones
            table = pq.read_table(file.parquet, columns=["uid", "text"])
            texts = table["text"].to_pylist()
            features = {"uid": table["uid"],
                        **({"text_concept": pa.array(text_concepts(texts, settings.vocabulary), pa.string())}
                           if concepts else {}),
                        **{name: values[file.rows] for name, values in columns.items()}}
            if matcher:
                matches = metaclip.match_entries(texts, matcher)
                features["metaclip_keep_probability"] = pa.array(
                    metaclip.keep_probabilities(matches, counts, settings.metaclip_t), pa.float32())
                features["metaclip_draw"] = pa.array(metaclip.shard_rng(settings.seed, i).random(len(texts)),
                                                     pa.float32())
            table = pa.table(features)
            require_valid(table, str(out_dir / file.parquet.name), "Not written: the pool's embeddings (its .npz "
                          "files) or an input file of the scale's give values that are not finite numbers.")
            write_parquet_atomically(table, out_dir / file.parquet.name)
        for stale in set(out_dir.glob("*.parquet")) - {out_dir / f.parquet.name for f in files}:
            stale.unlink()  # the features of a metadata file no longer in the pool, which a rule would join
        record_table(out_dir, [out_dir / f.parquet.name for f in files])  # the manifest readers check
        lap("write")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": n, "files": len(files), "clusters": settings.clusters if clustered else 0,
            "target_clusters": target_clusters,
            "columns": ", ".join(c for c in pq.read_schema(out_dir / files[0].parquet.name).names if c != "uid"),
            "metaclip_entries": len(matcher.entries) if matcher else 0,
            "metaclip_entries_matched": int((counts > 0).sum()), "metaclip_t": settings.metaclip_t, **seconds}


def _scratch_file(path: Path, rows: int, width: int) -> tuple[Path, int, int]:
    """An empty float16 .npy of rows x width: (its path, the data's byte offset, width)."""
    offset = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width)).offset
    return path, offset, width


_SPACES = re.compile(r"\s+")


def caption_hash(texts: Sequence[str | None]) -> np.ndarray:
    """A 64-bit hash of each caption, lowercased with runs of spaces collapsed: equal captions, equal hashes."""
    import pandas as pd

    normalized = np.array([_SPACES.sub(" ", (t or "").lower()).strip() for t in texts], dtype=object)
    return pd.util.hash_array(normalized, categorize=False)


def repeats(hashes: np.ndarray) -> np.ndarray:
    """For each row, how many rows of the pool share its hash (itself included)."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    return counts[inverse].astype(np.int64)


class ScratchArray:
    """A read-only view of an .npy file on disk that holds no pages once a read returns: each read maps the file,
    copies what it needs and unmaps it. A plain memory map keeps every page it ever touched resident, so one pass
    over a 12.8M-row pool would count 20 GB against the process; here memory holds one block at a time."""

    def __init__(self, path: Path):
        self.path = path
        header = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = header.shape, header.dtype, header.ndim
        del header

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mapped[key])
        finally:
            del mapped


def _pool_columns(embeddings: Mapping[str, np.ndarray], captioned: np.ndarray, settings: FeatureSettings,
                  target_embeddings: np.ndarray | None, vas_targets: np.ndarray | None, hype_heads: Path | None,
                  lap: Callable[[str], None]) -> tuple[dict[str, np.ndarray], int]:
    """The columns that need the whole pool (k-means clusters, SemDeDup similarities, density pruning, VAS,
    negCLIPLoss, NormSim and HYPE scores), and how many clusters hold a target image."""
    chunk = image_based.DEFAULT_CHUNK
    images, texts = embeddings[EMBEDDING_KEY], embeddings.get(TEXT_EMBEDDING_KEY)

    def captioned_blocks():
        for start in range(0, len(captioned), chunk):
            yield np.asarray(images[start:start + chunk][captioned[start:start + chunk]])

    def kmeans(rows) -> np.ndarray:
        return image_based.train_centroids(rows, settings.clusters, seed=settings.seed,
                                           max_points=settings.kmeans_max_points)

    columns, targets = {}, np.empty(0, np.int64)
    if settings.wants_image_clusters():
        # image_based: centroids of the caption-filtered pool, as upstream; every sample gets its nearest one.
        image_centroids = kmeans(captioned_blocks())
        lap("image_kmeans")
        clusters = image_based.assign(images, image_centroids)
        columns["image_cluster"] = clusters
        if target_embeddings is not None:
            targets = image_based.target_clusters(target_embeddings, image_centroids)
            columns["in_target_cluster"] = np.isin(clusters, targets)
        lap("image_assign")
    if target_embeddings is not None and settings.wants("normsim"):
        columns["normsim"] = negclip.normsim(images, target_embeddings)
        lap("normsim")
    if settings.wants("semdedup_max_similarity", "density_pruning_keep"):
        # SemDeDup: its own clustering of the whole pool (it deduplicates within clusters, captions aside).
        semdedup_centroids = kmeans(images)
        semdedup_clusters = image_based.assign(images, semdedup_centroids)
        columns["semdedup_max_similarity"] = semdedup.semdedup_max_similarity(images, semdedup_clusters)
        lap("semdedup")
        if settings.wants("density_pruning_keep"):
            # Density-based pruning: per-cluster quotas over the same clusters, among SemDeDup's survivors (all of
            # them when fewer survive than the target).
            eligible = columns["semdedup_max_similarity"] <= settings.density_pruning_semdedup
            columns["density_pruning_keep"] = prototypes.density_based_pruning(
                images, semdedup_clusters, semdedup_centroids, eligible=eligible,
                target=min(int(eligible.sum()), round(settings.density_pruning_fraction * len(images)))).keep
            lap("density_pruning")
    if vas_targets is not None and settings.wants("vas_score"):
        columns["vas_score"] = vas.vas_scores(images, vas.target_covariance(vas_targets))
        lap("vas")
    if texts is not None and settings.wants("negclip_loss"):
        # A batch is at most a tenth of the pool, so the ten batchings differ (at tiny, 2,000 of 20,000 rows).
        batch_size = max(1, min(settings.negclip_batch_size, len(images) // 10))
        columns["negclip_loss"] = negclip.negclip_loss(images, texts, batch_size=batch_size, seed=settings.seed)
        lap("negclip")
    if texts is not None and hype_heads is not None and settings.wants_hype():
        columns.update(hyperbolic.hype_scores(hyperbolic.load_heads(hype_heads), images, texts))
        lap("hype")
    return columns, len(targets)
