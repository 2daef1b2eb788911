"""The one Definitions object of the code location (`dagster dev`, `dagster asset materialize`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import dagster as dg  # noqa: E402

from datacomp_assets.evaluation.assets import eval_results, eval_suite  # noqa: E402
from datacomp_assets.filtering.assets import pool_features, subset, subset_is_valid  # noqa: E402
from datacomp_assets.leaderboard.assets import leaderboard  # noqa: E402
from datacomp_assets.metadata.assets import dfn_model, pool_metadata, scorer_models  # noqa: E402
from datacomp_assets.pool.assets import (  # noqa: E402
    curated_source, external_sources, pool_index, pool_shards, pool_shards_match_injected_faults)
from datacomp_assets.training.assets import checkpoint, checkpoint_loads  # noqa: E402
from resources import (  # noqa: E402
    AcceleratorResource, DownloaderResource, EvaluationDataResource, ExternalSourcesResource, PublishedMetadataResource, StorageResource,
    SyntheticWebResource)

POOL_ASSETS = [pool_index, pool_shards, curated_source, external_sources, scorer_models, dfn_model, pool_metadata,
               eval_suite, pool_features]
STRATEGY_ASSETS = [subset, checkpoint, eval_results]
ALL_ASSETS = [*POOL_ASSETS, *STRATEGY_ASSETS, leaderboard]
CHECKS = [subset_is_valid, checkpoint_loads, pool_shards_match_injected_faults]

RESOURCES = {
    "storage": StorageResource(),
    "accelerator": AcceleratorResource(),
    "downloader": DownloaderResource(),
    "synthetic_web": SyntheticWebResource(),
    "published": PublishedMetadataResource(),
    "external": ExternalSourcesResource(),
    "eval_data": EvaluationDataResource(),
}

defs = dg.Definitions(assets=ALL_ASSETS, asset_checks=CHECKS, resources=RESOURCES)
