import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from datacomp_assets.core import settings
from datacomp_assets.core.layout import Layout
from datacomp_assets.core.locks import exclusive


class StorageResource(dg.ConfigurableResource):
    """The storage root; every artifact's path under it comes from its `layout`."""

    root: str = settings.DATACOMP_HOME.default

    @property
    def layout(self) -> Layout:
        # Outside a run (the command line, before or after materializing) the root may still be an EnvVar.
        root = self.root.get_value() if isinstance(self.root, dg.EnvVar) else self.root
        return Layout(Path(root))

    @contextmanager
    def writing(self, context: dg.AssetExecutionContext) -> Iterator[None]:
        """Hold the one-writer lock of the asset partition `context` materializes; a second writer fails at once,
        naming this run."""
        asset = context.asset_key.path[-1]
        scale = strategy = None
        if context.has_partition_key:
            key = context.partition_key
            dims = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else {"scale": key}
            scale, strategy = dims.get("scale"), dims.get("strategy")
        artifact = f"{asset}[{'|'.join(p for p in (scale, strategy) if p)}]" if scale else asset
        with exclusive(self.layout.lock_file(asset, scale, strategy), artifact, f"run {context.run_id}"):
            try:
                yield
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                where = Path(err.filename) if err.filename else self.layout.root
                free = shutil.disk_usage(where if where.exists() else self.layout.root).free / 2**20
                raise OSError(errno.ENOSPC, f"{artifact}: the disk is full writing {where} ({free:,.0f} MB free "
                                            "there); free space, then materialize again") from err
