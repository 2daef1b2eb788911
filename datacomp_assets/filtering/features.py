"""Per-sample features that filters beyond the metadata need, computed once per pool (no Dagster).

One parquet per metadata shard (same stem), keyed by uid, joined to the metadata by the strategies:

| column | for | how |
|---|---|---|
| text_concept | text_based | first caption word naming a class of the vocabulary (ImageNet's, or the tiny analogue's) |
| image_cluster, in_target_cluster | image_based | faiss k-means of the caption-filtered pool's L/14 image embeddings; is the cluster nearest to some target image |
| semdedup_max_similarity | SemDeDup | highest cosine to a sample ranked before it in its cluster (k-means of the whole pool) |
| vas_score | VAS | x^T Sigma_target x for the L/14 image embedding x |
| metaclip_keep_probability, metaclip_draw | MetaCLIP | 1 - prod(1 - t / max(count_e, t)) over matched entries; a seeded uniform draw |
| dfn_score | DFN | cosine of image and caption embeddings by the data filtering network |

Counts (MetaCLIP), centroids (k-means) and the target covariance (VAS) need the whole pool: they are reduced
once over all shards, then every shard is mapped with them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.filtering import image_based, metaclip, semdedup, vas

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


def passes_image_based_captions(table: pa.Table) -> np.ndarray:
    """English (fastText), more than 1 fastText token and more than 5 characters."""
    language = np.asarray(table["language"].to_pylist(), dtype=object)
    return ((language == "en") & (table["num_tokens"].to_numpy(zero_copy_only=False) > 1)
            & (table["num_chars"].to_numpy(zero_copy_only=False) > 5))


@dataclass
class PoolShard:
    stem: str
    uids: list[str]
    texts: list[str]
    image_embeddings: np.ndarray  # L/14, unit norm, float32
    image_based_captions: np.ndarray  # bool: the caption passes the image-based baseline's caption filter


def read_pool(metadata_dir: str | os.PathLike, embedding_key: str = "l14_img") -> list[PoolShard]:
    """Every metadata shard's uids, captions, caption filter and image embeddings (the .npz beside the parquet)."""
    shards = []
    for path in sorted(Path(metadata_dir).glob("*.parquet")):
        missing = [c for c in CAPTION_COLUMNS if c not in pq.read_schema(path).names]
        if missing:
            raise ValueError(f"{path} lacks the caption features {missing}: pool_features needs them "
                             "(materialize pool_metadata again)")
        table = pq.read_table(path, columns=["uid", "text", *CAPTION_COLUMNS])
        npz = path.with_suffix(".npz")
        if not npz.exists():
            raise FileNotFoundError(f"{npz} is missing: pool_features needs the metadata's embeddings")
        with np.load(npz) as arrays:
            if embedding_key not in arrays:
                raise ValueError(f"{npz} has no {embedding_key!r} embeddings (keys: {sorted(arrays)})")
            emb = arrays[embedding_key].astype(np.float32)
        if len(emb) != table.num_rows:
            raise ValueError(f"{npz}: {len(emb)} embeddings for {table.num_rows} metadata rows")
        shards.append(PoolShard(path.stem, table["uid"].to_pylist(), table["text"].to_pylist(), emb,
                                passes_image_based_captions(table)))
    if not shards:
        raise FileNotFoundError(f"no metadata parquet in {metadata_dir}; materialize pool_metadata first")
    return shards


@dataclass(frozen=True)
class FeatureSettings:
    vocabulary: Mapping[str, str]           # caption word -> class (text_based)
    metaclip_entries: Sequence[str]
    metaclip_t: float
    clusters: int                           # k-means clusters (image_based, SemDeDup)
    seed: int = 0
    kmeans_max_points: int | None = None    # train k-means on a seeded sample of this many rows


def compute_pool_features(metadata_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: FeatureSettings,
                          target_embeddings: np.ndarray, dfn_scores: Mapping[str, float] | None = None,
                          log: Callable[[str], None] = print) -> dict:
    """Write `<out_dir>/<stem>.parquet` (uid + the feature columns) for every metadata shard.

    `target_embeddings`: L/14 image embeddings of the target set (ImageNet's training images, or the tiny
    analogue's). `dfn_scores`: uid -> data filtering network score (NaN where absent).
    """
    shards = read_pool(metadata_dir)
    all_emb = np.concatenate([s.image_embeddings for s in shards])
    captioned = np.concatenate([s.image_based_captions for s in shards])
    log(f"pool_features: {len(all_emb)} samples in {len(shards)} shards ({int(captioned.sum())} pass the "
        f"image-based caption filter); k-means into {settings.clusters} clusters")

    def kmeans(embeddings: np.ndarray) -> np.ndarray:
        return image_based.train_centroids(embeddings, settings.clusters, seed=settings.seed,
                                           max_points=settings.kmeans_max_points)

    # image_based: centroids of the caption-filtered pool, as upstream; every sample gets its nearest one.
    image_centroids = kmeans(all_emb[captioned])
    clusters = image_based.assign(all_emb, image_centroids)
    targets = image_based.target_clusters(target_embeddings, image_centroids)
    # SemDeDup: its own clustering of the whole pool (it deduplicates within clusters, captions aside).
    max_similarity = semdedup.semdedup_max_similarity(all_emb, image_based.assign(all_emb, kmeans(all_emb)))
    vas_scores = vas.vas_scores(all_emb, vas.target_covariance(target_embeddings))

    matcher = metaclip.build_matcher(settings.metaclip_entries)
    matches = [metaclip.match_entries(s.texts, matcher) for s in shards]
    counts = metaclip.reduce_counts(metaclip.entry_counts(m, len(matcher.entries)) for m in matches)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, shard in enumerate(shards):
        rows = slice(start, start + len(shard.uids))
        start = rows.stop
        keep_p = metaclip.keep_probabilities(matches[i], counts, settings.metaclip_t)
        draw = metaclip.shard_rng(settings.seed, i).random(len(shard.uids))
        dfn = [np.nan if dfn_scores is None else dfn_scores.get(u, np.nan) for u in shard.uids]
        table = pa.table({
            "uid": shard.uids,
            "text_concept": pa.array(text_concepts(shard.texts, settings.vocabulary), pa.string()),
            "image_cluster": pa.array(clusters[rows], pa.int64()),
            "in_target_cluster": pa.array(np.isin(clusters[rows], targets)),
            "semdedup_max_similarity": pa.array(max_similarity[rows], pa.float32()),
            "vas_score": pa.array(vas_scores[rows], pa.float32()),
            "metaclip_keep_probability": pa.array(keep_p, pa.float32()),
            "metaclip_draw": pa.array(draw, pa.float32()),
            "dfn_score": pa.array(dfn, pa.float32()),
        })
        tmp = temporary_sibling(out_dir / f"{shard.stem}.parquet")
        pq.write_table(table, tmp)
        os.replace(tmp, out_dir / f"{shard.stem}.parquet")
    matched_entries = int((counts > 0).sum())
    return {"rows": len(all_emb), "shards": len(shards), "clusters": settings.clusters,
            "target_clusters": len(targets), "metaclip_entries": len(matcher.entries),
            "metaclip_entries_matched": matched_entries, "metaclip_t": settings.metaclip_t}
