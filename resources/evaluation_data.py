import os
from pathlib import Path

import dagster as dg


class EvaluationDataResource(dg.ConfigurableResource):
    """Where DataComp's 38 reference test sets live at the paper's scales (the folder layout of DataComp's own
    downloader), and whether missing ones may be fetched from the Hugging Face Hub. The tiny scale builds its
    own suite and ignores this."""

    directory: str = os.environ.get("DATACOMP_EVAL_DATA", "")  # "": <storage root>/eval_data
    download: bool = False  # the full set is tens of GB: fetching it is opted into

    def root(self, storage_root: str) -> Path:
        return Path(self.directory or Path(storage_root) / "eval_data").resolve()
