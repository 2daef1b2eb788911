import os

import dagster as dg


class PublishedMetadataResource(dg.ConfigurableResource):
    """Where the paper scales' published metadata comes from: the Hugging Face Hub, or a local mirror in the
    published layout (one `<shard>.parquet` per shard, optionally `<shard>.npz`)."""

    published_mirror_dir: str = os.environ.get("DATACOMP_MIRROR", "")
    include_npz: bool = False
