"""The pool metadata format: one parquet per shard plus an .npz of embeddings in the same row order.

The parquet columns follow the reference (DataComp's published metadata); the extra caption feature columns are
what our filters need: written with the metadata at the synthetic web, computed on demand at a published pool
(`core.caption_features`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datacomp_assets.core.files import replace_atomically, write_parquet_atomically

POOL_METADATA_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("clip_b32_similarity_score", pa.float32()),
    ("clip_l14_similarity_score", pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
    ("sha256", pa.string()),
])

# Features beyond the reference columns (see core/language.py for how they are computed).
EXTRA_COLUMNS = pa.schema([
    ("language", pa.string()),
    ("language_score", pa.float32()),
    ("cld3_language", pa.string()),
    ("num_words", pa.int32()),
    ("num_chars", pa.int32()),
    ("num_tokens", pa.int32()),
])

FULL_SCHEMA = pa.schema(list(POOL_METADATA_SCHEMA) + list(EXTRA_COLUMNS))

# L2-normalized embeddings in the .npz: image and text, for CLIP B/32 (512-d) and L/14 (768-d).
NPZ_KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")


def validate_metadata(path_or_table: str | os.PathLike | pa.Table, *, require_extra: bool = False) -> None:
    """Raise ValueError naming the file and every missing reference column (and extras if required).

    For a path, only the parquet footer is read, so this is cheap on large shards.
    """
    if isinstance(path_or_table, pa.Table):
        where, names = "table", set(path_or_table.column_names)
    else:
        where = str(path_or_table)
        try:
            names = set(pq.read_schema(path_or_table).names)
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"{where}: is not a readable parquet file ({str(err).splitlines()[0]})") from None
    required = FULL_SCHEMA.names if require_extra else POOL_METADATA_SCHEMA.names
    missing = [name for name in required if name not in names]
    if missing:
        raise ValueError(f"{where}: missing metadata columns {', '.join(missing)}")


def conform_types(table: pa.Table) -> pa.Table:
    """Cast known columns to their declared types (e.g. int64 counts to int32); others pass through."""
    fields = [FULL_SCHEMA.field(name) if name in FULL_SCHEMA.names else table.schema.field(name)
              for name in table.column_names]
    return table.cast(pa.schema(fields))



def write_metadata_shard(table: pa.Table, embeddings: dict[str, np.ndarray], out_stem: str | os.PathLike) -> None:
    """Write `<stem>.parquet` (the table) and `<stem>.npz` (float16 embeddings, same row order).

    The npz is written first: a shard counts as done once its parquet exists (resume logic and
    `read_parquet('<dir>/*.parquet')` both key on the parquet), so it must never lack its npz.
    """
    validate_metadata(table)
    table = conform_types(table)
    stem = Path(out_stem)
    unknown = set(embeddings) - set(NPZ_KEYS)
    if unknown:
        raise ValueError(f"{stem}: unknown embedding keys {sorted(unknown)}; expected {NPZ_KEYS}")
    arrays = {key: np.asarray(value, dtype=np.float16) for key, value in embeddings.items()}
    for key, arr in arrays.items():
        if len(arr) != table.num_rows:
            raise ValueError(f"{stem}: embedding {key} has {len(arr)} rows, table has {table.num_rows}")

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object stops np.savez from appending ".npz" to the name
            np.savez(f, **arrays)

    replace_atomically(write_npz, stem.with_name(stem.name + ".npz"))
    write_parquet_atomically(table, stem.with_name(stem.name + ".parquet"))
