"""Partitions: the compute scale, the filtering strategy, and their product."""

import dagster as dg

from datacomp_assets.core.layout import Asset
from datacomp_assets.core.scales import SCALES, ScaleConfig, get_scale
from datacomp_assets.core.strategies import STRATEGIES

scale_partitions = dg.StaticPartitionsDefinition(list(SCALES))
strategy_partitions = dg.StaticPartitionsDefinition(list(STRATEGIES))
scale_strategy_partitions = dg.MultiPartitionsDefinition({"scale": scale_partitions, "strategy": strategy_partitions})
# A per-strategy asset reads its scale's pool assets; the leaderboard reads every strategy of its scale.
by_scale = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="scale")
# ... and its strategy's definition.
by_strategy = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="strategy")
STRATEGY_DEFINITION = dg.AssetDep(Asset.STRATEGY_DEFINITIONS, partition_mapping=by_strategy)


def scale_and_strategy(context: dg.AssetExecutionContext) -> tuple[ScaleConfig, str]:
    key = context.partition_key.keys_by_dimension
    return get_scale(key["scale"]), key["strategy"]


__all__ = ["SCALES", "ScaleConfig", "get_scale", "scale_partitions", "strategy_partitions",
           "scale_strategy_partitions", "by_scale", "STRATEGY_DEFINITION", "scale_and_strategy"]
