"""Filtering-stage throughput at the small scale: caption features, metadata-only strategies, image-based k-means.

    .venv/bin/python benchmarks/filters.py [--rows 12800000] [--files 26] [--embeddings 1000000]
                                           [--centroids 1000] [--out DIR]

Writes (once, cached under --out) a metadata set the size of the small pool in the reference schema, then
times, from raw parquet, each step against its limit in the same run:

1. caption features (fastText lid.176 language + score and word/char/token counts), computed once by
   `compute_caption_features`, against bare fastText `predict` over the same captions with the same number of
   processes (target: within 1.1x); CLD3 over the same captions is timed too (informational);
2. every metadata-only strategy through `select_uids` + `save_subset`, reusing those features, against a bare
   DuckDB query of the same rule over the same files (target: within 2x, and within 2 GB);
3. the image-based step: k-means of L/14-sized (768-d, float16) embeddings and nearest-centroid assignment,
   streamed shard by shard from .npy memmaps.

Each timed step runs in a fresh spawned child process, so its peak memory is its own: `peak_rss_mb` is the
highest sampled RSS summed over the step's process tree (the child plus any pool workers), `max_rss_mb` the
largest single process's peak (ru_maxrss). Prints progress lines, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datacomp_assets.metadata.schema import POOL_METADATA_SCHEMA

SPAWN = multiprocessing.get_context("spawn")

# ---------------------------------------------------------------- the synthetic metadata set

ENGLISH = """a an the of and with in on for to at by from new old best cheap free top modern vintage classic
photo image picture stock illustration vector background pattern texture design logo icon set of
white black red blue green yellow pink orange purple grey brown gold silver dark light bright colorful
man woman girl boy child children baby family couple people person portrait face smiling happy young
dog cat puppy kitten bird horse fish flower flowers tree trees garden forest mountain mountains lake river
beach sea ocean sky sunset sunrise cloud clouds snow winter summer spring autumn fall rain city street
house home kitchen bedroom bathroom living room interior wall floor door window table chair sofa bed
car truck bike bicycle motorcycle train plane boat road bridge building tower church castle
food pizza cake coffee tea wine beer salad chicken bread fruit apple banana chocolate breakfast dinner
dress shirt shoes jacket jeans hat bag watch ring necklace earrings fashion style women's men's kids
wedding party birthday christmas holiday travel vacation hotel resort view landscape nature park
book cover poster card print art painting drawing sketch watercolor wallpaper sticker decal frame
phone laptop computer camera screen case cover charger cable keyboard mouse tv
size large small mini big inch cm x 2 3 4 5 10 12 2018 2019 2020 2021 pack pcs lot sale
premium quality handmade custom personalized gift idea ideas diy easy how make best simple
- | & : , . ( ) 1 with for on""".split()
FRENCH = """le la les un une des de du et avec pour sur dans en au aux photo image belle beau nouveau
nouvelle maison jardin chien chat fleur fleurs arbre montagne mer plage ciel coucher soleil ville rue
femme homme enfant enfants famille robe chaussures sac cuisine chambre salle bain table chaise voiture
vélo route pont église château gâteau café vin pain fruit pomme chocolat petit déjeuner dîner mariage
anniversaire noël vacances hôtel vue paysage nature livre affiche carte tableau dessin fond
blanc noir rouge bleu vert jaune rose gris""".split()
GERMAN = """der die das ein eine und mit für auf im in am zum zur von bild foto schöne schöner neue neues
haus garten hund katze blume blumen baum berg berge see meer strand himmel sonnenuntergang stadt straße
frau mann kind kinder familie kleid schuhe tasche küche schlafzimmer badezimmer tisch stuhl auto
fahrrad brücke kirche schloss kuchen kaffee wein brot obst apfel schokolade frühstück abendessen
hochzeit geburtstag weihnachten urlaub hotel aussicht landschaft natur buch plakat karte gemälde
zeichnung hintergrund weiß schwarz rot blau grün gelb""".split()
SPANISH = """el la los las un una de del y con para en al foto imagen hermosa hermoso nuevo nueva casa
jardín perro gato flor flores árbol montaña mar playa cielo atardecer ciudad calle mujer hombre niño
niños familia vestido zapatos bolso cocina dormitorio baño mesa silla coche bicicleta puente iglesia
castillo pastel café vino pan fruta manzana chocolate desayuno cena boda cumpleaños navidad
vacaciones hotel vista paisaje naturaleza libro cartel tarjeta cuadro dibujo fondo blanco negro rojo
azul verde amarillo""".split()
LANGUAGES = ("en", "fr", "de", "es", "junk")
LANGUAGE_SHARE = (0.72, 0.06, 0.06, 0.06, 0.10)
HOSTS = [f"https://{a}{b}.{c}" for a in ("img", "cdn", "images", "static", "media", "i", "s", "photos")
         for b in ("", "1", "2", "3") for c in ("com", "net", "org", "co.uk", "de", "fr", "es")]
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _junk_words(rng: np.random.Generator, n: int = 3000) -> list[str]:
    """File-name-like captions: IMG_1234, DSC01234.JPG, 1024x768, untitled-3, ..."""
    forms = ["IMG_{:04d}", "DSC{:05d}.JPG", "img{:d}", "{:d}x{:d}", "untitled-{:d}", "P{:07d}", "photo_{:d}.jpg",
             "image{:d}", "{:d}", "_MG_{:04d}", "screenshot {:d}", "thumb-{:d}"]
    out = []
    for i in range(n):
        form = forms[i % len(forms)]
        values = rng.integers(0, 10_000, 2)
        out.append(form.format(*values[: form.count("{")]))
    return out


def _vocabulary(rng: np.random.Generator) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Every word twice (as is, then capitalised, for the first word of a caption); per language its range."""
    words, ranges = [], {}
    for name, vocab in zip(LANGUAGES, (ENGLISH, FRENCH, GERMAN, SPANISH, _junk_words(rng))):
        ranges[name] = (len(words), len(vocab))
        words += vocab
    return words + [w[:1].upper() + w[1:] for w in words], ranges


def make_captions(rng: np.random.Generator, n: int) -> pa.Array:
    """`n` alt-text-like captions, built as one Arrow string buffer with numpy (no Python string per row).

    Per caption: a language (English mostly; French, German, Spanish; file-name junk), a length (1-40 words,
    about 9 on average; junk 1-2), Zipf-like word frequencies, a tenth of the words of non-English captions
    in English, and a capitalised first word half of the time."""
    vocab, ranges = _vocabulary(np.random.default_rng(0))
    capital = len(vocab) // 2
    blob = np.frombuffer("".join(w + " " for w in vocab).encode(), dtype=np.uint8)
    sizes = np.array([len(w.encode()) + 1 for w in vocab], dtype=np.int64)  # each word with its trailing space
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    lang = rng.choice(len(LANGUAGES), n, p=LANGUAGE_SHARE)
    junk = lang == LANGUAGES.index("junk")
    n_words = np.clip(np.rint(rng.lognormal(2.0, 0.6, n)), 1, 40).astype(np.int64)
    n_words[junk] = rng.integers(1, 3, junk.sum())
    row = np.repeat(np.arange(n), n_words)
    word_lang = lang[row]
    word_lang[(word_lang > 0) & (word_lang != LANGUAGES.index("junk")) & (rng.random(len(row)) < 0.1)] = 0
    first = np.zeros(len(row), dtype=bool)
    first[np.concatenate([[0], np.cumsum(n_words)[:-1]])] = True
    offset = np.array([ranges[name][0] for name in LANGUAGES])[word_lang]
    count = np.array([ranges[name][1] for name in LANGUAGES])[word_lang]
    word = offset + (count * rng.random(len(row)) ** 2.5).astype(np.int64)  # rank-skewed frequencies
    word[first & (rng.random(len(row)) < 0.5)] += capital
    last = np.roll(first, -1)  # the word before the next caption's first word (and the very last word)
    length = sizes[word] - last  # no trailing space after a caption's last word
    # gather the words' bytes from the blob
    total = int(length.sum())
    word_start = np.cumsum(length) - length
    within = np.arange(total, dtype=np.int64) - np.repeat(word_start, length)
    data = blob[np.repeat(starts[word], length) + within]
    row_bytes = np.bincount(row, weights=length, minlength=n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_bytes)]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _hex_strings(rng: np.random.Generator, n: int, n_bytes: int) -> pa.Array:
    raw = rng.integers(0, 256, (n, n_bytes), dtype=np.uint8)
    chars = np.empty((n, 2 * n_bytes), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 0x0F]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * n_bytes)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.ravel()))


def _face_bboxes(rng: np.random.Generator, n: int) -> pa.Array:
    """Mostly empty; otherwise 1-3 normalised [x1, y1, x2, y2] boxes."""
    counts = rng.choice(4, n, p=(0.85, 0.10, 0.04, 0.01))
    boxes = int(counts.sum())
    corner = rng.random((boxes, 2)) * 0.8
    values = np.concatenate([corner, corner + 0.05 + rng.random((boxes, 2)) * 0.15], axis=1).ravel()
    inner = pa.ListArray.from_arrays(pa.array(np.arange(boxes + 1, dtype=np.int32) * 4), pa.array(values))
    outer = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer), inner)


def make_metadata(n: int, seed: int) -> pa.Table:
    """`n` rows in the reference schema. CLIP scores follow CommonPool's shares: B/32 >= 0.25 / 0.28 / 0.30
    keep about 30% / 17% / 10%; L/14 is correlated with B/32."""
    rng = np.random.default_rng(seed)
    uid = _hex_strings(rng, n, 16)
    hosts = pa.array(HOSTS).take(pa.array(rng.integers(0, len(HOSTS), n)))
    url = pc.binary_join_element_wise(hosts, "/", pc.utf8_slice_codeunits(uid, 0, 12), ".jpg", "")
    side = np.clip(rng.lognormal(6.3, 0.6, n), 32, 8000)
    aspect = np.exp(rng.normal(0.1, 0.45, n))
    b32 = rng.normal(0.215, 0.066, n).astype(np.float32)
    l14 = (0.8 * (b32 - 0.215) + rng.normal(0.20, 0.045, n)).astype(np.float32)
    return pa.Table.from_arrays([
        uid, url, make_captions(rng, n),
        pa.array(np.rint(side * np.sqrt(aspect)).astype(np.int64)),
        pa.array(np.rint(side / np.sqrt(aspect)).astype(np.int64)),
        pa.array(b32), pa.array(l14), _face_bboxes(rng, n), _hex_strings(rng, n, 32),
    ], schema=POOL_METADATA_SCHEMA)


def _write_metadata_file(task: tuple[str, int, int]) -> float:
    path, n, seed = task
    start = time.perf_counter()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    pq.write_table(make_metadata(n, seed), tmp)
    os.replace(tmp, path)
    return time.perf_counter() - start


def ensure_metadata(directory: Path, rows: int, files: int, processes: int) -> dict:
    """The metadata set: `files` parquet files with `rows` in all; files already there with the right row
    count are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = [rows // files + (i < rows % files) for i in range(files)]
    tasks = []
    for i, n in enumerate(counts):
        path = directory / f"{i:08d}.parquet"
        if not (path.exists() and pq.read_metadata(path).num_rows == n):
            tasks.append((str(path), n, 1000 + i))
    start = time.perf_counter()
    if tasks:
        with SPAWN.Pool(processes) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_metadata_file, tasks), 1):
                log(f"  metadata: wrote {done}/{len(tasks)} files")
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.glob("*.parquet"))
    return {"rows": rows, "files": files, "generated_files": len(tasks), "seconds": round(seconds, 1),
            "bytes": size, "dir": str(directory)}


def log(message: str) -> None:
    print(message, flush=True)
