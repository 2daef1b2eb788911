import os
from pathlib import Path

import dagster as dg


class StorageResource(dg.ConfigurableResource):
    """The storage root; assets write `<root>/<scale>/<asset>/[<strategy>/]...` themselves."""

    root: str = os.environ.get("DATACOMP_HOME", "data")

    def path(self, scale: str, asset: str, strategy: str | None = None) -> Path:
        p = Path(self.root).resolve() / scale / asset
        return p / strategy if strategy else p
