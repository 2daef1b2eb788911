"""Mirrors in DataComp's published layout: stand-ins for ``mlfoundations/datacomp_{scale}`` on the Hub.

A published scale is a folder of ``<stem>.parquet`` files (the reference columns, ``POOL_METADATA_SCHEMA``) with
``<stem>.npz`` beside each: ``b32_img``, ``b32_txt`` (N x 512) and ``l14_img``, ``l14_txt`` (N x 768), float16,
L2-normalized rows in the parquet's row order. Here stems are ``0000000000``, ``0000000001``, ...

Two writers, both deterministic for a seed:

- ``write_mirror_from_index``: the loopback synthetic web's pool index (``world.index.write_pool_index``) as
  published metadata, to rehearse the paper scales' code path end to end: img2dataset fetches the index's URLs
  (and verifies the index's sha256, the real hash of the crawled bytes), while scores and embeddings carry the
  ground truth the way OpenAI's CLIP would (captions that describe their image score high, mismatched and
  noisy ones low; near-duplicates have nearly identical image embeddings).
- ``write_synthetic_mirror``: a pool of any size (the small scale's 12.8M rows in 26 files) for benchmarks,
  written file by file and, within a file, in chunks of rows (bounded memory), with nothing to download
  (urls under ``example.invalid``).

Every score is the cosine of the stored image and text embeddings (to float16 rounding), as in the published
metadata. Embeddings are built as a prototype (per object class or cluster) plus noise of a fixed low rank, so
k-means, SemDeDup and VAS have structure to find. The npz files are uncompressed zips of .npy members, as
``np.savez`` writes them, streamed member by member with fixed timestamps (so equal inputs give equal bytes).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datacomp_assets.core.files import temporary_sibling, write_parquet_atomically
from datacomp_assets.core.schema import NPZ_KEYS, POOL_METADATA_SCHEMA, validate_metadata
from datacomp_assets.world.web import COLORS, OBJECTS, SYNONYMS

STEM_DIGITS = 10
MIRROR_FILE = re.compile(r"^\d{%d}\.(parquet|npz)$" % STEM_DIGITS)
EMBEDDING_DIMS = {"b32": 512, "l14": 768}
CHUNK_ROWS = 16_384  # rows of embeddings generated at once (~50 MB of float32 per temporary at 768-d)
FACE_SHARE = 0.03    # rows with one face box (the published metadata lists Haar/RetinaFace boxes)

# CLIP score (mean, sd) by how well the caption describes its image, in OpenAI CLIP's range (about 0.1-0.45).
# L/14 separates matched from unmatched pairs slightly better than B/32 (a wider gap, less spread).
MATCHED, PARTIAL, UNMATCHED = 0, 1, 2
SCORE_LEVELS = {
    "b32": ((0.33, 0.035), (0.25, 0.040), (0.18, 0.040)),
    "l14": ((0.32, 0.032), (0.22, 0.038), (0.14, 0.034)),
}
SCORE_RANGE = (-0.05, 0.55)
SHARED_SCORE_WEIGHT = 0.8  # the two models' scores share this much of their noise (correlation ~0.64)

# Geometry: each embedding is unit(centre + spread * low-rank noise); centres share a common direction (CLIP
# embeddings are anisotropic), near-duplicates are their source's embedding plus DUPLICATE_SPREAD of noise.
NOISE_RANK = 64
IMAGE_SPREAD = {"b32": 1.0, "l14": 0.9}
TEXT_SPREAD = {"b32": 1.0, "l14": 1.0}
COMMON_WEIGHT = 0.8
DUPLICATE_SPREAD = 0.15  # cosine ~0.99 with the source: a re-encode or a small shift, as CLIP sees it

# The index mirror: how each noise kind of the synthetic web (world.web.NOISE_KINDS) reads to CLIP. CLIP reads:
# an image showing its caption's words scores as a matched pair whether or not the object is drawn
# (text_only is what T-MARS corrects); a vague caption is near every image and close to none.
KIND_LEVEL = {"clean": MATCHED, "small": MATCHED, "odd_aspect": MATCHED, "unsafe": MATCHED, "eval_copy": MATCHED,
              "near_duplicate": MATCHED, "text_only": MATCHED, "text_overlay": MATCHED, "non_english": PARTIAL,
              "vague": PARTIAL, "mismatched": UNMATCHED, "spam": UNMATCHED, "short": UNMATCHED,
              "off_topic": UNMATCHED}
TRUTH_COLUMNS = ("uid", "kind", "object", "width", "height")


# ---------------------------------------------------------------- shared pieces


def _stable_int(*parts: object) -> int:
    """A seed from names, the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= np.maximum(norms, 1e-12)[:, None]
    return x


class _Space:
    """One CLIP model's embedding space: named prototype directions and a fixed low-rank noise basis."""

    def __init__(self, seed: int, model: str) -> None:
        self.seed, self.model, self.dim = seed, model, EMBEDDING_DIMS[model]
        rng = np.random.default_rng([seed, _stable_int("noise-basis", model)])
        # Rows of norm ~1, so noise(n) has rows of norm ~1.
        self.basis = (rng.standard_normal((NOISE_RANK, self.dim), dtype=np.float32)
                      / np.float32(np.sqrt(self.dim * NOISE_RANK)))
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def directions(self, name: str, count: int = 1) -> np.ndarray:
        """`count` random unit vectors named `name` (count x dim, float32)."""
        key = (name, count)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, _stable_int("direction", self.model, name)])
            self._cache[key] = _unit_rows(rng.standard_normal((count, self.dim), dtype=np.float32))
        return self._cache[key]

    def direction(self, name: str) -> np.ndarray:
        return self.directions(name)[0]

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal((n, NOISE_RANK), dtype=np.float32) @ self.basis


def _image_embeddings(space: _Space, rng: np.random.Generator, centres: np.ndarray,
                      dup_rows: np.ndarray, dup_sources: np.ndarray) -> np.ndarray:
    """unit(centre + noise) per row; a duplicate row is its source's embedding, lightly perturbed."""
    x = space.noise(rng, len(centres))
    x *= np.float32(IMAGE_SPREAD[space.model])
    x += centres
    _unit_rows(x)
    if len(dup_rows):
        x[dup_rows] = _unit_rows(x[dup_sources] + np.float32(DUPLICATE_SPREAD) * space.noise(rng, len(dup_rows)))
    return x


def _text_embeddings(space: _Space, rng: np.random.Generator, images: np.ndarray, centres: np.ndarray,
                     scores: np.ndarray, dup_rows: np.ndarray, dup_sources: np.ndarray) -> np.ndarray:
    """Unit text embeddings whose cosine with `images` is exactly `scores`, pulled towards `centres`.

    text = s * image + sqrt(1 - s^2) * u, with u the unit part of (centre + noise) orthogonal to the image."""
    v = space.noise(rng, len(centres))
    v *= np.float32(TEXT_SPREAD[space.model])
    v += centres
    if len(dup_rows):
        v[dup_rows] = v[dup_sources] + np.float32(DUPLICATE_SPREAD) * space.noise(rng, len(dup_rows))
    v -= np.einsum("ij,ij->i", v, images)[:, None] * images
    s = scores.astype(np.float32)
    v *= (np.sqrt(np.float32(1) - s * s) / np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v)), 1e-12))[:, None]
    v += s[:, None] * images
    return v


def _draw_scores(rng: np.random.Generator, level: np.ndarray) -> dict[str, np.ndarray]:
    """float32 B/32 and L/14 scores for rows of the given levels (MATCHED, PARTIAL, UNMATCHED)."""
    shared = rng.standard_normal(len(level), dtype=np.float32)
    out = {}
    for model, levels in SCORE_LEVELS.items():
        mean = np.array([m for m, _ in levels], np.float32)[level]
        sd = np.array([s for _, s in levels], np.float32)[level]
        own = rng.standard_normal(len(level), dtype=np.float32)
        mix = SHARED_SCORE_WEIGHT * shared + np.float32(np.sqrt(1 - SHARED_SCORE_WEIGHT ** 2)) * own
        out[model] = np.clip(mean + sd * mix, *SCORE_RANGE).astype(np.float32)
    return out


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _random_hex(rng: np.random.Generator, n: int, nbytes: int) -> pa.Array:
    """n random lowercase hex strings of 2 * nbytes chars, built in Arrow's buffers (no per-row Python)."""
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    chars = np.empty((n, 2 * nbytes), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 0x0F]
    offsets = np.arange(0, n * 2 * nbytes + 1, 2 * nbytes, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def _face_bboxes(rng: np.random.Generator, n: int) -> pa.Array:
    """Mostly empty lists; FACE_SHARE of the rows hold one normalized [x1, y1, x2, y2] box."""
    has = rng.random(n) < FACE_SHARE
    k = int(has.sum())
    x1, y1 = rng.uniform(0, 0.8, k), rng.uniform(0, 0.8, k)
    w = rng.uniform(0.04, 0.2, k)
    h = w * rng.uniform(0.9, 1.4, k)
    boxes = np.stack([x1, y1, np.minimum(x1 + w, 1.0), np.minimum(y1 + h, 1.0)], axis=1).ravel()
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * k + 1, 4, dtype=np.int32)),
                                     pa.array(boxes, pa.float64()))
    outer_offsets = np.concatenate([[0], np.cumsum(has)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner).cast(POOL_METADATA_SCHEMA.field("face_bboxes").type)


def _stem(number: int) -> str:
    return f"{number:0{STEM_DIGITS}d}"


def _write_npz(path: Path, n: int, members: Iterable[tuple[str, int, Iterable[np.ndarray]]]) -> None:
    """An uncompressed .npz (what np.savez writes), each member streamed chunk by chunk, atomically.

    Members get a fixed timestamp, so the same arrays always give the same bytes."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, dim, chunks in members:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                              "shape": (n, dim)}
                    np.lib.format.write_array_header_1_0(member, header)
                    written = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=np.float16)
                        if chunk.ndim != 2 or chunk.shape[1] != dim:
                            raise ValueError(f"{path}: {key} chunk has shape {chunk.shape}, expected (*, {dim})")
                        member.write(chunk.data)
                        written += len(chunk)
                    if written != n:
                        raise ValueError(f"{path}: {key} has {written} rows, expected {n}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)



def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Mirror files of an earlier, larger (or embedding-carrying) run that this one did not write."""
    for path in out_dir.iterdir():
        if MIRROR_FILE.match(path.name) and path.name not in keep:
            path.unlink()


def _check_files(files: int, rows: int) -> None:
    if files < 1:
        raise ValueError(f"files must be at least 1, got {files}")
    if rows < files:
        raise ValueError(f"{rows} rows cannot fill {files} files")


# ---------------------------------------------------------------- the synthetic web's index as published metadata


def _caption_objects(texts: list[str]) -> tuple[list[str], list[str]]:
    """The object and colour an English caption of the synthetic web names ("" where it names none)."""
    phrases = sorted(((p, obj) for obj in OBJECTS for p in {obj, *SYNONYMS.get(obj, [])}),
                     key=lambda item: -len(item[0]))
    objects, colors = [], []
    for text in texts:
        lower = (text or "").lower()
        objects.append(next((obj for phrase, obj in phrases if phrase.lower() in lower), ""))
        colors.append(next((c for c in COLORS if c in lower.split()), ""))
    return objects, colors


def _name_centres(space: _Space, parts: list[tuple[list[str], str, float]], n: int) -> np.ndarray:
    """Sum over (names per row, prefix, weight) of weight * direction(prefix + name); "" names add nothing."""
    centres = np.broadcast_to(COMMON_WEIGHT * space.direction("common"), (n, space.dim)).copy()
    for names, prefix, weight in parts:
        vocab = sorted({name for name in names if name})
        if not vocab:
            continue
        table = np.vstack([space.direction(prefix + name) for name in vocab] + [np.zeros(space.dim, np.float32)])
        position = {name: i for i, name in enumerate(vocab)}
        ids = np.array([position.get(name, len(vocab)) for name in names], dtype=np.int64)
        centres += np.float32(weight) * table[ids]
    return centres


def write_mirror_from_index(index_file: str | os.PathLike, ground_truth_file: str | os.PathLike,
                            out_dir: str | os.PathLike, files: int, seed: int = 0) -> list[Path]:
    """Write the pool index (uid, url, text, sha256) as `files` published-layout parquet + npz pairs.

    uid, url and text come from the index, sha256 too when it has one (the hash of the crawled bytes, which
    img2dataset verifies; null otherwise), original_width/height from the ground truth. Scores and
    embeddings follow the ground truth's noise kind (``KIND_LEVEL``): captions that describe their image, or
    whose words the image shows, score ~0.33, non-English and vague ones ~0.24, mismatched or noisy ones ~0.16;
    image embeddings gather around their object (plus colour and style, and rendered text where the image has
    some), near-duplicates sit on their source, copies of one evaluation image on each other. Rows keep the
    index's order, split into `files` consecutive parts. Returns the parquet paths.
    """
    index = pq.read_table(index_file)
    truth = pq.read_table(ground_truth_file)
    missing = [c for c in ("uid", "url", "text") if c not in index.column_names]
    missing += [c for c in TRUTH_COLUMNS if c not in truth.column_names]
    if missing:
        raise ValueError(f"{index_file}, {ground_truth_file}: missing columns {', '.join(missing)}")
    n = index.num_rows
    _check_files(files, n)
    uids = index.column("uid").to_pylist()
    row_of_uid = {uid: row for row, uid in enumerate(truth.column("uid").to_pylist())}
    absent = [uid for uid in uids if uid not in row_of_uid]
    if absent:
        raise ValueError(f"{ground_truth_file}: no ground truth for {len(absent)} uids of the index, e.g. {absent[0]}")
    truth = truth.take(pa.array([row_of_uid[uid] for uid in uids], pa.int64()))

    def column(name: str, default=None) -> list:
        return truth.column(name).to_pylist() if name in truth.column_names else [default] * n

    kinds, objects = column("kind"), [o or "" for o in column("object")]
    colors, styles, languages = [c or "" for c in column("color")], column("style", ""), column("language", "en")
    texts = index.column("text").to_pylist()
    rng = np.random.default_rng([seed, _stable_int("index-mirror")])

    # Near-duplicates copy an earlier sample (their source), by the web's sample index.
    row_of_index = {i: row for row, i in enumerate(column("index")) if i is not None}
    sources = [row_of_index.get(d, -1) if d is not None else -1 for d in column("duplicate_of")]
    dup_rows = np.array([row for row, src in enumerate(sources) if src >= 0 and kinds[row] == "near_duplicate"],
                        dtype=np.int64)
    dup_sources = np.array([sources[row] for row in dup_rows], dtype=np.int64)

    level = np.array([KIND_LEVEL.get(kind, MATCHED) for kind in kinds], dtype=np.int64)
    scores = _draw_scores(rng, level)
    for model in scores:  # a copy scores as its source did, up to the re-encoding
        jitter = rng.normal(0, 0.003, len(dup_rows)).astype(np.float32)
        scores[model][dup_rows] = scores[model][dup_sources] + jitter

    # What the caption is about: the image's object, except where the caption is someone else's or none.
    caption_objects, caption_colors = _caption_objects(texts)
    text_object, text_color, text_extra = [], [], []
    for row, kind in enumerate(kinds):
        if kind == "mismatched":
            text_object.append(caption_objects[row])
            text_color.append(caption_colors[row])
        elif kind in ("spam", "short", "off_topic", "vague"):
            text_object.append("")
            text_color.append("")
        else:
            text_object.append(objects[row])
            text_color.append(colors[row])
        text_extra.append({"spam": "spam", "short": "file name", "off_topic": "texture", "unsafe": "unsafe",
                           "vague": "generic"}.get(
            kind, f"language {languages[row]}" if kind == "non_english" else ""))
    image_extra = ["texture" if not obj else "rendered text" if kind in ("text_only", "text_overlay") else ""
                   for obj, kind in zip(objects, kinds)]
    eval_rows = [(row, i) for row, (kind, i) in enumerate(zip(kinds, column("eval_index")))
                 if kind == "eval_copy" and i is not None]

    embeddings: dict[str, np.ndarray] = {}
    for model in EMBEDDING_DIMS:
        space = _Space(seed, model)
        img_rng = np.random.default_rng([seed, _stable_int("index-mirror", model, "image")])
        txt_rng = np.random.default_rng([seed, _stable_int("index-mirror", model, "text")])
        centres = _name_centres(space, [(objects, "object ", 1.0), (colors, "colour ", 0.5),
                                        (styles, "style ", 0.35), (image_extra, "", 1.0)], n)
        spread = np.float32(IMAGE_SPREAD[model])
        for row, i in eval_rows:  # copies of one evaluation image: its embedding, lightly edited
            eval_rng = np.random.default_rng([seed, _stable_int("eval image", model, i)])
            anchor = _unit_rows(centres[row][None, :] + spread * space.noise(eval_rng, 1))[0]
            # unit(k * anchor + spread * noise) == unit(anchor + DUPLICATE_SPREAD * noise)
            centres[row] = anchor * (spread / np.float32(DUPLICATE_SPREAD))
        images = _image_embeddings(space, img_rng, centres, dup_rows, dup_sources)
        text_centres = _name_centres(space, [(text_object, "object ", 1.0), (text_color, "colour ", 0.5),
                                             (text_extra, "", 1.0)], n)
        embeddings[f"{model}_img"] = images
        embeddings[f"{model}_txt"] = _text_embeddings(space, txt_rng, images, text_centres, scores[model],
                                                      dup_rows, dup_sources)

    width = np.array(column("width"), dtype=np.int64)
    height = np.array(column("height"), dtype=np.int64)
    sha256 = (index.column("sha256").combine_chunks().cast(pa.string()) if "sha256" in index.column_names
              else pa.nulls(n, pa.string()))
    table = pa.Table.from_arrays([
        index.column("uid").combine_chunks().cast(pa.string()),
        index.column("url").combine_chunks().cast(pa.string()),
        index.column("text").combine_chunks().cast(pa.string()),
        pa.array(width), pa.array(height),
        pa.array(scores["b32"], pa.float32()), pa.array(scores["l14"], pa.float32()),
        _face_bboxes(rng, n), sha256,
    ], schema=POOL_METADATA_SCHEMA)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bounds = np.linspace(0, n, files + 1).round().astype(np.int64)
    for number, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        stem = _stem(number)
        part = table.slice(int(a), int(b - a))
        validate_metadata(part)
        _write_npz(out / f"{stem}.npz", int(b - a),
                   [(key, EMBEDDING_DIMS[key[:3]], [embeddings[key][a:b]]) for key in NPZ_KEYS])
        write_parquet_atomically(part, out / f"{stem}.parquet")  # last: a parquet means its npz is there
        written.append(out / f"{stem}.parquet")
    _remove_stale(out, {p.name for p in written} | {p.with_suffix(".npz").name for p in written})
    return written


# ---------------------------------------------------------------- a synthetic pool of any size

CLUSTERS = 1000       # image clusters (fine), Zipf-distributed
CLUSTER_GROUPS = 50   # coarse groups of 20 clusters each
CLUSTER_ZIPF = 0.8
DUPLICATE_SHARE = 0.04  # rows that copy an earlier row of their chunk (image, caption, scores)
# Caption languages: English, four Latin-script languages, and short or empty file-name captions.
ENGLISH_SHARE, SHORT_SHARE = 0.72, 0.03
MATCHED_SHARE = {"en": 0.72, "other": 0.5, "short": 0.15}  # captions that describe their image

_CATEGORIES = ("det", "adj", "noun", "verb", "prep", "conj")
DET, ADJ, NOUN, VERB, PREP, CONJ = range(len(_CATEGORIES))
# Sentence shapes, truncated to the caption's length: article, adjective, noun, verb, preposition, conjunction.
_TEMPLATES = np.array([
    [DET, ADJ, NOUN, VERB, PREP, DET, ADJ, NOUN, CONJ, DET, NOUN, PREP, DET, ADJ, NOUN],
    [ADJ, NOUN, PREP, DET, NOUN, CONJ, ADJ, NOUN, VERB, PREP, DET, NOUN, CONJ, PREP, NOUN],
    [DET, NOUN, PREP, DET, ADJ, NOUN, VERB, PREP, DET, NOUN, CONJ, DET, ADJ, NOUN, CONJ],
    [ADJ, ADJ, NOUN, CONJ, NOUN, PREP, DET, NOUN, VERB, PREP, DET, ADJ, NOUN, PREP, NOUN],
], dtype=np.int64)
MAX_WORDS = _TEMPLATES.shape[1]

_VOCABULARY = {
    "en": {
        "det": "a the this my our your some two three one every that".split(),
        "adj": ("red blue green white black yellow small large big little old new beautiful cute happy modern "
                "vintage wooden metal bright dark colorful funny classic simple elegant fresh sunny cozy rustic "
                "tiny huge young golden silver pink purple orange brown gray soft shiny wild quiet busy famous "
                "local traditional handmade custom natural original perfect favorite lovely amazing real free "
                "digital hot cold tall short").split(),
        "noun": ("dog cat car goldfish tiger lion elephant zebra horse bird eagle owl penguin shark whale snake "
                 "turtle frog butterfly bee spider rabbit squirrel fox wolf bear monkey cow sheep pig chicken duck "
                 "goose flamingo parrot pelican jellyfish lobster crab snail hamster koala panda gorilla camel "
                 "truck bus bicycle motorcycle airplane boat train tractor ambulance ship canoe helmet backpack "
                 "umbrella guitar piano violin drum laptop keyboard mouse monitor television telephone camera "
                 "clock watch lamp chair table sofa bed desk bookcase bottle cup mug teapot plate bowl spoon knife "
                 "pizza burger sandwich banana apple strawberry pineapple lemon mushroom broccoli cabbage cake "
                 "bread coffee wine house church castle bridge tower lighthouse barn fountain beach mountain "
                 "volcano valley lake river forest garden park street city village road sunset flower daisy rose "
                 "tree shoe sneaker boot dress jacket shirt sweater hat sunglasses necklace ring wallet book "
                 "poster logo icon pattern map kitchen bedroom bathroom office wedding party family girl boy "
                 "woman man baby child team player sale design print set edition style collection photo image "
                 "picture wallpaper background vector illustration").split(),
        "verb": ("sitting standing running playing sleeping walking flying swimming looking eating holding "
                 "waiting jumping smiling resting parked hanging lying growing shining is are").split(),
        "prep": "on in with at near under by from for of over behind beside inside into".split(),
        "conj": "and or very outside together today again here there now always".split(),
    },
    "de": {
        "det": "der die das ein eine unser mein".split(),
        "adj": "schöne kleine große alte neue rote blaue grüne weiße schwarze moderne günstige lustige".split(),
        "noun": ("Hund Katze Auto Haus Garten Baum Blume Kirche Straße Stadt Strand Berg Tisch Stuhl Küche "
                 "Hochzeit Kinder Frau Mann Geschenk Bild Foto Kleid Schuhe").split(),
        "verb": "sitzt steht spielt schläft läuft liegt wartet wohnt ist sind".split(),
        "prep": "auf in mit unter neben für vor im am zum".split(),
        "conj": "und oder auch sehr hier heute nicht".split(),
    },
    "es": {
        "det": "el la los las un una mi nuestra".split(),
        "adj": "bonito pequeño grande viejo nuevo rojo azul verde blanco negro moderno barato hermosa".split(),
        "noun": ("perro gato coche casa jardín árbol flor iglesia calle ciudad playa montaña mesa silla cocina "
                 "boda niños mujer hombre regalo imagen foto vestido zapatos").split(),
        "verb": "está juega duerme corre vive espera sentado caminando es son".split(),
        "prep": "en con de del sobre para bajo por al desde".split(),
        "conj": "y o muy también aquí hoy pero".split(),
    },
    "fr": {
        "det": "le la les un une mon notre des".split(),
        "adj": "petit grand belle vieux nouveau rouge bleu vert blanc noir moderne joli heureux".split(),
        "noun": ("chien chat voiture maison jardin arbre fleur église rue ville plage montagne table chaise "
                 "cuisine mariage enfants femme homme cadeau photo robe chaussures chambre").split(),
        "verb": "est joue dort court attend habite mange sont".split(),
        "prep": "sur dans avec pour sous près chez du au de".split(),
        "conj": "et ou très aussi ici aujourd'hui mais".split(),
    },
    "it": {
        "det": "il la lo gli le un una mio".split(),
        "adj": "bello piccolo grande vecchio nuovo rosso azzurro verde bianco nero moderno bellissima felice".split(),
        "noun": ("cane gatto macchina casa giardino albero fiore chiesa strada città spiaggia montagna tavolo "
                 "sedia cucina matrimonio bambini donna uomo regalo foto vestito scarpe camera").split(),
        "verb": "è gioca dorme corre aspetta vive mangia sono".split(),
        "prep": "su in con per sotto vicino nel della alla di".split(),
        "conj": "e o molto anche qui oggi ma".split(),
    },
}
LANGUAGES = tuple(_VOCABULARY)  # "en" first
SHORT_CAPTIONS = ("", "", "img", "image", "photo", "untitled", "pic", "jpg", "thumbnail", "-", "IMG", "DSC")
SHORT_NUMBERED = ("IMG_{}", "DSC{}", "{}.jpg", "image {}", "photo_{}", "P{}")


def _vocabulary() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(words, offset[lang, category], count[lang, category]): every language's words in one list."""
    words: list[str] = []
    offset = np.zeros((len(LANGUAGES), len(_CATEGORIES)), dtype=np.int64)
    count = np.zeros_like(offset)
    for i, lang in enumerate(LANGUAGES):
        for j, category in enumerate(_CATEGORIES):
            offset[i, j], count[i, j] = len(words), len(_VOCABULARY[lang][category])
            words += _VOCABULARY[lang][category]
    return words, offset, count


_WORDS, _OFFSET, _COUNT = _vocabulary()


def _captions(rng: np.random.Generator, lang: np.ndarray, concept: np.ndarray, dup_rows: np.ndarray,
              dup_sources: np.ndarray) -> pa.Array:
    """One caption per row, as word ids joined in Arrow: `lang` indexes LANGUAGES (-1: a short caption),
    `concept` the cluster the caption is about (its first noun names it)."""
    n = len(lang)
    short = lang < 0
    lang_ = np.where(short, 0, lang)
    template = rng.integers(0, len(_TEMPLATES), n)
    categories = _TEMPLATES[template]  # (n, MAX_WORDS)
    counts = _COUNT[lang_[:, None], categories]
    ids = _OFFSET[lang_[:, None], categories] + (rng.random((n, MAX_WORDS)) * counts).astype(np.int64)
    first_noun = np.argmax(categories == NOUN, axis=1)
    ids[np.arange(n), first_noun] = _OFFSET[lang_, NOUN] + concept % _COUNT[lang_, NOUN]
    english = lang == 0
    # English: 2-15 words (mostly 4-10); other languages 3-12.
    length = np.where(english, np.clip(np.rint(rng.lognormal(np.log(6.5), 0.45, n)), 2, MAX_WORDS),
                      np.clip(np.rint(rng.lognormal(np.log(6.0), 0.4, n)), 3, 12)).astype(np.int64)
    capitalize = rng.random(n) < 0.35
    ids[capitalize, 0] += len(_WORDS)  # the capitalized copy of the vocabulary
    # Short captions: one "word" from a per-call list of file names and one-word captions.
    numbered = [form.format(int(k)) for form, k in zip(rng.choice(SHORT_NUMBERED, 256),
                                                         rng.integers(0, 10_000, 256))]
    shorts = list(SHORT_CAPTIONS) + numbered
    ids[short, 0] = 2 * len(_WORDS) + rng.integers(0, len(shorts), int(short.sum()))
    length[short] = 1
    ids[dup_rows], length[dup_rows] = ids[dup_sources], length[dup_sources]
    vocabulary = pa.array(_WORDS + [w[:1].upper() + w[1:] for w in _WORDS] + shorts, pa.string())
    keep = np.arange(MAX_WORDS)[None, :] < length[:, None]
    words = vocabulary.take(pa.array(ids[keep]))
    offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")


def _sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(width, height): mostly 200-2000 px on the short side, 13% smaller, 6% with aspect ratio above 3."""
    u = rng.random(n)
    short_side = np.where(u < 0.13, rng.integers(32, 200, n),
                          np.clip(rng.lognormal(np.log(480), 0.5, n), 200, 4000)).astype(np.int64)
    aspect = np.where(rng.random(n) < 0.06, rng.uniform(3.05, 8.0, n), np.clip(rng.lognormal(0, 0.25, n), 1, 3))
    long_side = np.rint(short_side * aspect).astype(np.int64)
    landscape = rng.random(n) < 0.6
    return np.where(landscape, long_side, short_side), np.where(landscape, short_side, long_side)


class _SyntheticFile:
    """One file of the synthetic mirror: its rows' latent structure, table, and embedding chunks."""

    def __init__(self, seed: int, number: int, first_row: int, n: int) -> None:
        self.seed, self.number, self.n = seed, number, n
        self._geometries: dict[str, tuple[_Space, np.ndarray, np.ndarray]] = {}
        rng = np.random.default_rng([seed, _stable_int("synthetic-mirror", number, "rows")])
        u = rng.random(n)
        self.lang = np.where(u < ENGLISH_SHARE, 0, rng.integers(1, len(LANGUAGES), n))
        self.lang[u > 1 - SHORT_SHARE] = -1
        weights = np.arange(1, CLUSTERS + 1, dtype=np.float64) ** -CLUSTER_ZIPF
        self.cluster = rng.choice(CLUSTERS, size=n, p=weights / weights.sum())
        matched_p = np.where(self.lang == 0, MATCHED_SHARE["en"],
                             np.where(self.lang > 0, MATCHED_SHARE["other"], MATCHED_SHARE["short"]))
        matched = rng.random(n) < matched_p
        self.text_cluster = np.where(matched, self.cluster, rng.choice(CLUSTERS, size=n, p=weights / weights.sum()))
        level = np.where(matched, np.where(self.lang == 0, MATCHED, PARTIAL), UNMATCHED)
        self.scores = _draw_scores(rng, level)
        self.dup_rows, self.dup_sources = self._duplicates(rng)
        for key in ("lang", "cluster", "text_cluster"):
            values = getattr(self, key)
            values[self.dup_rows] = values[self.dup_sources]
        for model in self.scores:
            jitter = rng.normal(0, 0.003, len(self.dup_rows)).astype(np.float32)
            self.scores[model][self.dup_rows] = self.scores[model][self.dup_sources] + jitter
        text = _captions(rng, self.lang, self.text_cluster, self.dup_rows, self.dup_sources)
        width, height = _sizes(rng, n)
        width[self.dup_rows], height[self.dup_rows] = width[self.dup_sources], height[self.dup_sources]
        rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64)).cast(pa.string())
        self.table = pa.Table.from_arrays([
            _random_hex(rng, n, 16),
            pc.binary_join_element_wise("https://example.invalid/", rows, ".jpg", ""),
            text, pa.array(width), pa.array(height),
            pa.array(self.scores["b32"]), pa.array(self.scores["l14"]),
            _face_bboxes(rng, n), _random_hex(rng, n, 32),
        ], schema=POOL_METADATA_SCHEMA)

    def _duplicates(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rows that copy an earlier, original row of the same chunk (so each chunk's embeddings stand alone)."""
        dup = rng.random(self.n) < DUPLICATE_SHARE
        originals = np.flatnonzero(~dup)
        rows = np.flatnonzero(dup)
        before = np.searchsorted(originals, rows)  # originals before the row
        chunk_start = np.searchsorted(originals, rows // CHUNK_ROWS * CHUNK_ROWS)
        available = before - chunk_start
        ok = available > 0
        rows, before, chunk_start, available = rows[ok], before[ok], chunk_start[ok], available[ok]
        sources = originals[chunk_start + (rng.random(len(rows)) * available).astype(np.int64)]
        return rows, sources

    def _geometry(self, model: str) -> tuple[_Space, np.ndarray, np.ndarray]:
        """The model's space, its image cluster prototypes and its caption centres (cached).

        Caption centres: one table per caption language (LANGUAGES, then short captions), each the cluster
        prototypes plus, for all but English, the language's direction; row = language * CLUSTERS + cluster."""
        if model not in self._geometries:
            space = _Space(self.seed, model)
            fine, coarse = space.directions("cluster", CLUSTERS), space.directions("group", CLUSTER_GROUPS)
            prototypes = (COMMON_WEIGHT * space.direction("common") + fine
                          + 0.8 * coarse[np.arange(CLUSTERS) * CLUSTER_GROUPS // CLUSTERS])
            languages = space.directions("language", len(LANGUAGES) + 1).copy()
            languages[0] = 0  # English captions: CLIP's own language
            captions = (prototypes[None, :, :] + 0.7 * languages[:, None, :]).reshape(-1, space.dim)
            self._geometries[model] = (space, prototypes, captions)
        return self._geometries[model]

    def _chunk(self, model: str, a: int, b: int, text: bool) -> np.ndarray:
        space, prototypes, captions = self._geometry(model)
        in_chunk = (self.dup_rows >= a) & (self.dup_rows < b)
        dup_rows, dup_sources = self.dup_rows[in_chunk] - a, self.dup_sources[in_chunk] - a
        chunk = a // CHUNK_ROWS
        img_rng = np.random.default_rng([self.seed, _stable_int("synthetic-mirror", self.number, chunk, model, "img")])
        images = _image_embeddings(space, img_rng, prototypes[self.cluster[a:b]], dup_rows, dup_sources)
        if not text:
            return images
        language = np.where(self.lang[a:b] < 0, len(LANGUAGES), self.lang[a:b])
        centres = captions[language * CLUSTERS + self.text_cluster[a:b]]
        txt_rng = np.random.default_rng([self.seed, _stable_int("synthetic-mirror", self.number, chunk, model, "txt")])
        return _text_embeddings(space, txt_rng, images, centres, self.scores[model][a:b], dup_rows, dup_sources)

    def chunks(self, key: str) -> Iterator[np.ndarray]:
        model, part = key.split("_")
        for a in range(0, self.n, CHUNK_ROWS):
            yield self._chunk(model, a, min(a + CHUNK_ROWS, self.n), text=part == "txt")


def write_synthetic_mirror(out_dir: str | os.PathLike, rows: int, files: int, seed: int = 0,
                           embeddings: bool = True, progress: Callable[[str], object] | None = print,
                           npz_keys: Sequence[str] = NPZ_KEYS) -> list[Path]:
    """Write a synthetic pool of `rows` rows in `files` published-layout files; return the parquet paths.

    Captions: ~72% English sentences of 2-15 words (a few hundred words, ImageNet-like nouns among them), ~25%
    German, Spanish, French or Italian, ~3% short or empty; urls ``https://example.invalid/<row>.jpg``; sizes
    varied (13% under 200 px, 6% with aspect ratio above 3); 4% near-duplicates of an earlier row. Without
    `embeddings`, no npz is written (a metadata-only mirror); `npz_keys` chooses its members (`l14_img` alone is
    30% of the bytes: the image-embedding methods at sizes whose whole npz would not fit on a disk); the parquets
    are the same either way. Files are generated one at a time, embeddings CHUNK_ROWS rows at a time (memory
    stays under ~1 GB at 500k rows per file); a parquet is written after its npz, so a parquet on disk means its
    file is complete.
    """
    _check_files(files, rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).round().astype(np.int64)
    written: list[Path] = []
    keep: set[str] = set()
    for number, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        start = time.perf_counter()
        stem = _stem(number)
        synthetic = _SyntheticFile(seed, number, int(a), int(b - a))
        if embeddings:
            _write_npz(out / f"{stem}.npz", synthetic.n,
                       [(key, EMBEDDING_DIMS[key[:3]], synthetic.chunks(key)) for key in npz_keys])
            keep.add(f"{stem}.npz")
        write_parquet_atomically(synthetic.table, out / f"{stem}.parquet")
        keep.add(f"{stem}.parquet")
        written.append(out / f"{stem}.parquet")
        if progress is not None:
            progress(f"{stem}: {synthetic.n:,} rows in {time.perf_counter() - start:.1f} s ({number + 1}/{files})")
    _remove_stale(out, keep)
    return written


# ---------------------------------------------------------------- download_upstream.py's --data_dir


def write_upstream_metadata(index_file: str | os.PathLike, ground_truth_file: str | os.PathLike,
                            data_dir: str | os.PathLike, files: int, seed: int = 0, npz: bool = True) -> list[Path]:
    """The metadata folder DataComp's download_upstream.py leaves: `<data_dir>/metadata/<stem>.parquet`, with
    `<stem>.npz` beside each only when `npz` (its --download_npz; off by default there). Returns the parquets."""
    parquets = write_mirror_from_index(index_file, ground_truth_file, Path(data_dir) / "metadata", files, seed)
    if not npz:
        for parquet in parquets:
            parquet.with_suffix(".npz").unlink()
    return parquets


def write_upstream_shards(data_dir: str | os.PathLike, shard_size: int = 10_000, processes: int = 1,
                          threads: int = 8, timeout: int = 10) -> Path:
    """`<data_dir>/shards/`, written by img2dataset with the arguments download_upstream.py gives it (its
    defaults: 512 px, keep_ratio_largest, jpg, webdataset, faces blurred, the uid kept); `shard_size` is its
    10,000 unless a test needs more shards, and `timeout` img2dataset's 10 s. It reads
    `<data_dir>/metadata/*.parquet` one file at a time, so the shards split at file boundaries, as the real ones
    do. Returns the shards folder."""
    import signal

    import img2dataset  # late: a slow import (opencv, albumentations)

    shards = Path(data_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    previous = signal.getsignal(signal.SIGINT)  # img2dataset's own handler would outlive the call
    try:
        img2dataset.download(
            url_list=str(Path(data_dir) / "metadata"), image_size=512, output_folder=str(shards),
            processes_count=processes, thread_count=threads, resize_mode="keep_ratio_largest",
            resize_only_if_bigger=True, encode_format="jpg", output_format="webdataset", input_format="parquet",
            url_col="url", caption_col="text", bbox_col="face_bboxes", save_additional_columns=["uid"],
            number_sample_per_shard=shard_size, oom_shard_count=8, timeout=timeout, enable_wandb=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    return shards
