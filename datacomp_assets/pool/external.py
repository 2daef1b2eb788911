"""Bring-your-own-data sources: image-text url lists from outside the pool, and the tiny scale's stand-in.

An external list (e.g. CC12M's tsv) has urls and captions but no DataComp uids, so each row gets a uid derived
from its url: stable across runs and machines, and the same image listed twice gets the same uid. The list
is rewritten as a parquet of uid, url, text that img2dataset downloads like the pool's index.

At `tiny` the pool's source adds a noisy synthetic source beside these (`world.curated.write_noisy_source`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from datacomp_assets.core.files import temporary_sibling


INPUT_FORMATS = ("parquet", "csv", "tsv")
INDEX_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string())])


@dataclass(frozen=True)
class ExternalSource:
    """A url list readable by img2dataset: a parquet, csv or tsv file with a url and a caption column."""

    name: str
    url_list: str
    url_col: str = "url"
    caption_col: str = "caption"
    input_format: str = ""  # parquet | csv | tsv; empty: taken from the file's suffix

    @property
    def format(self) -> str:
        fmt = self.input_format or Path(self.url_list).suffix.lstrip(".").lower()
        if fmt not in INPUT_FORMATS:
            raise ValueError(f"external source {self.name!r}: input format {fmt!r} of {self.url_list} is not "
                             f"one of {', '.join(INPUT_FORMATS)}")
        return fmt


def url_uid(url: str) -> str:
    """A 32-hex uid from the url alone (external lists carry no uid): the same url always maps to it."""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=16).hexdigest()


def _column_names(source: ExternalSource) -> list[str]:
    path, fmt = source.url_list, source.format
    if fmt == "parquet":
        return pq.read_schema(path).names
    with pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")) as r:
        return r.schema.names


def _record_batches(source: ExternalSource):
    """The url and caption columns, one record batch at a time (bounded memory for lists of millions)."""
    columns = [source.url_col, source.caption_col]
    if source.format == "parquet":
        yield from pq.ParquetFile(source.url_list).iter_batches(batch_size=65_536, columns=columns)
        return
    delimiter = "\t" if source.format == "tsv" else ","
    # Read every column as a string: a caption of digits must stay text.
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    with pacsv.open_csv(source.url_list, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                        convert_options=convert) as reader:
        yield from reader


def check_external_source(source: ExternalSource) -> None:
    """Raise ValueError naming the file and every missing column, before anything is written."""
    _ = source.format  # raises ValueError on an unknown format
    if not Path(source.url_list).is_file():
        raise ValueError(f"external source {source.name!r}: {source.url_list} does not exist")
    names = set(_column_names(source))
    missing = [c for c in (source.url_col, source.caption_col) if c not in names]
    if missing:
        raise ValueError(f"external source {source.name!r}: {source.url_list} lacks the column(s) "
                         f"{', '.join(missing)} (it has {', '.join(sorted(names))})")


def prepare_external_index(source: ExternalSource, out_path: str | os.PathLike) -> dict:
    """Write out_path: a parquet of uid, url, text (img2dataset's input, like the pool's index).

    Rows without a url are dropped, and so are repeated urls (they would repeat a uid); the summary
    counts both.
    """
    check_external_source(source)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    seen: set[str] = set()
    rows = empty = duplicates = 0
    try:
        with pq.ParquetWriter(tmp, INDEX_SCHEMA) as writer:
            for batch in _record_batches(source):
                uids, urls, texts = [], [], []
                for url, text in zip(batch.column(source.url_col).to_pylist(),
                                     batch.column(source.caption_col).to_pylist()):
                    url = (url or "").strip()
                    if not url:
                        empty += 1
                        continue
                    uid = url_uid(url)
                    if uid in seen:
                        duplicates += 1
                        continue
                    seen.add(uid)
                    uids.append(uid)
                    urls.append(url)
                    texts.append("" if text is None else str(text))
                writer.write_table(pa.table([uids, urls, texts], schema=INDEX_SCHEMA))
                rows += len(uids)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": source.name, "rows": rows, "dropped_empty_url": empty, "dropped_duplicate_url": duplicates,
            "path": str(out)}
