"""The code location tests/test_browser.py serves with `dagster dev`: the project's own Definitions (assets,
checks, resources, jobs, schedules, sensors) with the `tiny` scale swapped for the miniature configuration of
the end-to-end tests (tests/miniature.py).

Every process Dagster starts for this location (the code server, each run and step worker) imports this module,
so all of them see the miniature `tiny`. The storage root comes from `DATACOMP_HOME` (datacomp_assets/core/settings.py).
"""

from datacomp_assets.core.scales import SCALES
from tests.miniature import MINIATURE

SCALES["tiny"] = MINIATURE

from datacomp_assets.definitions import defs  # noqa: E402

__all__ = ["defs"]
