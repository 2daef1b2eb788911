"""The one Definitions object of the code location (`dagster dev`, `dagster asset materialize`)."""

from datacomp_assets.core import processes, settings

settings.apply_offline_defaults()  # before img2dataset or huggingface_hub is imported
# Each step process of the multiprocess executor loads this module first: it dies with the run's process, so a
# killed run leaves no step running and holding its artifact's lock. (A no-op in the run's own process.)
processes.die_with_the_run()

import dagster as dg  # noqa: E402

from datacomp_assets.automation import SCHEDULES, evaluate_new_checkpoints, evaluation_job, strategy_job  # noqa: E402
from datacomp_assets.evaluation.assets import eval_results, eval_suite  # noqa: E402
from datacomp_assets.filtering.assets import (  # noqa: E402
    image_scores, pool_features, recaptioned_source, strategy_definitions, subset, subset_is_valid)
from datacomp_assets.instance import free_orphaned_slots  # noqa: E402
from datacomp_assets.leaderboard.assets import leaderboard, scaling_analysis, submission  # noqa: E402
from datacomp_assets.metadata.assets import captioner_model, dfn_model, pool_metadata, scorer_models  # noqa: E402
from datacomp_assets.pool.assets import (  # noqa: E402
    curated_source, external_sources, pool_index, pool_shards, pool_shards_complete, pool_shards_match_injected_faults)
from datacomp_assets.training.assets import checkpoint, checkpoint_loads  # noqa: E402
from resources import (  # noqa: E402
    AcceleratorResource, DownloaderResource, EngineResource, EvaluationDataResource, ExternalSourcesResource,
    PoolSourceResource, PublishedMetadataResource, StorageResource, SyntheticWebResource)

POOL_ASSETS = [pool_index, pool_shards, curated_source, external_sources, scorer_models, dfn_model, captioner_model,
               pool_metadata, eval_suite, pool_features]
STRATEGY_ASSETS = [subset, checkpoint, eval_results]
ALL_ASSETS = [strategy_definitions, *POOL_ASSETS, image_scores, recaptioned_source, *STRATEGY_ASSETS, leaderboard,
              scaling_analysis, submission]
CHECKS = [subset_is_valid, checkpoint_loads, pool_shards_complete, pool_shards_match_injected_faults]


def from_environment(variable: settings.Variable) -> str | dg.EnvVar:
    """Resource configuration from an environment variable, as Dagster's EnvVar (so the UI shows where the value
    came from), or the variable's default when it is unset."""
    return dg.EnvVar(variable.name) if variable.is_set() else variable.default


RESOURCES = {
    "storage": StorageResource(root=from_environment(settings.DATACOMP_HOME)),
    "accelerator": AcceleratorResource(),
    "downloader": DownloaderResource(),
    "pool_source": PoolSourceResource(
        synthetic_web=SyntheticWebResource(),
        published=PublishedMetadataResource(published_mirror_dir=from_environment(settings.DATACOMP_MIRROR))),
    "external": ExternalSourcesResource(),
    "eval_data": EvaluationDataResource(directory=from_environment(settings.DATACOMP_EVAL_DATA)),
    "engine": EngineResource(ray_address=from_environment(settings.DATACOMP_RAY_ADDRESS)),
}

@dg.executor(name="multiprocess_freeing_orphaned_slots", config_schema=dg.multiprocess_executor.config_schema,
             requirements=dg.multiple_process_executor_requirements())
def multiprocess_freeing_orphaned_slots(init_context: dg.InitExecutorContext) -> dg.Executor:
    """Dagster's multiprocess executor, after freeing the pool slots of runs that died holding them.

    A run killed with SIGKILL (or by the OOM killer) stays STARTED and keeps its `gpu` slot; without a daemon
    (`dagster asset materialize`, a run started from a script) nothing would free it, and the retry would wait
    for the dead run forever. Every run starts here, so a retry proceeds at once."""
    free_orphaned_slots(init_context.instance)
    return dg.multiprocess_executor.executor_creation_fn(init_context)


# Runs launched from the UI, a backfill, a schedule or `dagster asset materialize` execute their steps in
# subprocesses, at most this many at once (default 2, the 2-core machine); steps of the `gpu` pool are further
# held to that pool's slots (the instance's, see instance/dagster.yaml). `python -m datacomp_assets.run`
# materializes in-process instead (and frees orphaned slots itself).
EXECUTOR = multiprocess_freeing_orphaned_slots.configured({"max_concurrent": settings.max_concurrent_steps()},
                                                          name="bounded_multiprocess")
if settings.ray_address():
    from dagster_ray import ray_executor

    # On a Ray cluster each step is a Ray job (dagster-ray): it runs on the cluster, and its logs and metadata
    # reach the instance, which the nodes must share (PostgreSQL). The project's variables go with it.
    EXECUTOR = ray_executor.configured(
        {"ray": {"address": settings.ray_jobs_address(), "env_vars": settings.ray_job_environment()}},
        name="ray_cluster")

defs = dg.Definitions(assets=ALL_ASSETS, asset_checks=CHECKS, resources=RESOURCES, executor=EXECUTOR,
                      jobs=[strategy_job, evaluation_job], schedules=SCHEDULES, sensors=[evaluate_new_checkpoints])
