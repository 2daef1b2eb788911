import errno
import re
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
        try:
            with exclusive(self.layout.lock_file(asset, scale, strategy), artifact, f"run {context.run_id}"):
                yield
        except OSError as err:  # the lock file's write included: a full disk may stop that first
            if not disk_full(err):
                raise
            # The file if the error names it, else the folder the asset partition writes in.
            where = Path(err.filename) if err.filename else (
                self.layout.asset_dir(scale, asset, strategy) if scale else self.layout.root / asset)
            free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
            raise OSError(errno.ENOSPC, f"{artifact}: the disk is full writing {where} ({size(free)} free there); "
                                        "free space, then materialize again") from err


# numpy's tofile (np.save into a file) reports a short write with no errno and no file name.
SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def disk_full(err: OSError) -> bool:
    """Whether `err` says the disk is full: ENOSPC, or a short write (numpy's "N requested and M written")."""
    return err.errno == errno.ENOSPC or (err.errno is None and bool(SHORT_WRITE.match(str(err))))


def size(n_bytes: float) -> str:
    """Free space in a unit that shows it: 96 KB, 512 MB, 310.2 GB."""
    for unit in ("bytes", "KB", "MB"):
        if n_bytes < 1024:
            return f"{n_bytes:,.0f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:,.1f} GB"
