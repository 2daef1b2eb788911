from pathlib import Path

import dagster as dg

from datacomp_assets.core.layout import Layout


class EvaluationDataResource(dg.ConfigurableResource):
    """Where DataComp's 38 reference test sets live at the paper's scales (the folder layout of DataComp's own
    downloader), and whether missing ones may be fetched from the Hugging Face Hub. The tiny scale builds its
    own suite and ignores this. `definitions.py` sets the directory from $DATACOMP_EVAL_DATA when that is set."""

    directory: str = ""  # "": the layout's reference_eval_data, under the storage root
    download: bool = False  # the full set is tens of GB: fetching it is opted into

    def root(self, layout: Layout) -> Path:
        return Path(self.directory).resolve() if self.directory else layout.reference_eval_data()
