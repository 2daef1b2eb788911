"""The shared core beneath the stages: the uid codec, webdataset shards, lineage records, the artifact layout,
settings, scales, the strategy registry, the metadata schema, the trainer and model loading. Plain Python: it
imports no stage, no Dagster and nothing from the synthetic world."""
