"""Partitions: the compute scale, the filtering strategy, their product, and the mappings between them."""

import dagster as dg

from datacomp_assets.core.layout import Asset
from datacomp_assets.core.scales import SCALES, ScaleConfig, get_scale
from datacomp_assets.core.scorers import IMAGE_SCORERS, image_score_column
from datacomp_assets.core.strategies import PARTITIONED, strategy_identifiers

scale_partitions = dg.StaticPartitionsDefinition(list(SCALES))
strategy_partitions = dg.StaticPartitionsDefinition(list(PARTITIONED))  # the registry and the paper's sweeps
scale_strategy_partitions = dg.MultiPartitionsDefinition({"scale": scale_partitions, "strategy": strategy_partitions})
# Models scored over the downloaded images, per scale: only strategies that read a model's score wait for images.
scorer_partitions = dg.StaticPartitionsDefinition(list(IMAGE_SCORERS))
scale_scorer_partitions = dg.MultiPartitionsDefinition({"scale": scale_partitions, "scorer": scorer_partitions})

# A per-strategy asset reads its scale's pool assets; the leaderboard reads every strategy of its scale.
by_scale = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="scale")
# ... and its strategy's definition.
by_strategy = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="strategy")
STRATEGY_DEFINITION = dg.AssetDep(Asset.STRATEGY_DEFINITIONS, partition_mapping=by_strategy)

# The miniature's own assets (scorer CLIPs, the curated source, the synthetic eval suite) feed the metadata only
# at scales whose pool is the synthetic web; at a published pool the same edges map to no partition at all, so
# the paper scales' metadata waits for neither images nor trained scorers.
on_synthetic_web = dg.StaticPartitionMapping(
    {name: name for name, scale in SCALES.items() if scale.pool_source == "synthetic_web"})

# A subset reads a model's image scores only when its rule does (e.g. dfn_30pct reads dfn_score).
reading_image_scores = dg.MultiPartitionMapping({
    "scale": dg.DimensionPartitionMapping("scale", dg.IdentityPartitionMapping()),
    "scorer": dg.DimensionPartitionMapping("strategy", dg.StaticPartitionMapping(
        {scorer: {name for name in PARTITIONED if image_score_column(scorer) in strategy_identifiers(name)}
         for scorer in IMAGE_SCORERS})),
})


def scale_and_strategy(context: dg.AssetExecutionContext) -> tuple[ScaleConfig, str]:
    key = context.partition_key.keys_by_dimension
    return get_scale(key["scale"]), key["strategy"]


def scale_and_scorer(context: dg.AssetExecutionContext) -> tuple[ScaleConfig, str]:
    key = context.partition_key.keys_by_dimension
    return get_scale(key["scale"]), key["scorer"]


__all__ = ["SCALES", "ScaleConfig", "get_scale", "scale_partitions", "strategy_partitions",
           "scale_strategy_partitions", "scorer_partitions", "scale_scorer_partitions", "by_scale", "by_strategy",
           "STRATEGY_DEFINITION", "on_synthetic_web", "reading_image_scores", "scale_and_strategy",
           "scale_and_scorer"]
