import dagster as dg


class ExternalSourcesResource(dg.ConfigurableResource):
    """Bring-your-own-data url lists (any list img2dataset reads: parquet, csv or tsv), by source name.

    Example: {"cc12m": "/data/cc12m.tsv"}; each needs a `url` and a `caption` column.
    """

    url_lists: dict[str, str] = {}
    url_col: str = "url"
    caption_col: str = "caption"
