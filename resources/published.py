import dagster as dg


class PublishedMetadataResource(dg.ConfigurableResource):
    """Where the paper scales' published metadata comes from: the Hugging Face Hub, or a local mirror in the
    published layout (one `<shard>.parquet` per shard, optionally `<shard>.npz`). `definitions.py` sets the
    mirror from $DATACOMP_MIRROR when that is set."""

    published_mirror_dir: str = ""
    include_npz: bool = False   # fetch the embeddings from the Hub too (a mirror's npz files are always linked)
    processes: int = 0          # worker processes for the caption features; 0: every core
