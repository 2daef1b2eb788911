from pathlib import Path

import dagster as dg

from datacomp_assets.core import settings
from datacomp_assets.core.layout import Layout


class StorageResource(dg.ConfigurableResource):
    """The storage root; every artifact's path under it comes from its `layout`."""

    root: str = settings.DATACOMP_HOME.default

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root))
