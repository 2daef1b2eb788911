"""Filtering stage: one subset (sorted `u8,u8` uid .npy) per (scale, strategy), with its checks."""

import io
import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from datacomp_assets.core.caption_features import CaptionFeatureStore
from datacomp_assets.core.layout import Asset, Group
from datacomp_assets.core.integrity import table_record, verified_values_version, verify_table
from datacomp_assets.core.files import replace_atomically
from datacomp_assets.core.lineage import code_revision, file_sha256, text_sha256, write_lineage
from datacomp_assets.core.strategies import (
    PARTITIONED, expected_fraction, get_strategy, sources_read, strategy_definition, strategy_identifiers,
    strategy_version, track)
from datacomp_assets.core.uids import (
    arrow_uids_to_array, isin_sorted, load_subset, save_subset, sort_uids, union_sorted, unique_sorted)
from datacomp_assets.filtering.selection import select_uids
from datacomp_assets.core.scorers import (
    IMAGE_SCORERS, RECAPTIONED_SOURCE, SCORER_MODEL, image_score_column)
from partitions import (
    STRATEGY_DEFINITION, by_scale, get_scale, on_synthetic_web, reading_image_scores, scale_and_scorer,
    scale_and_strategy, scale_partitions, scale_scorer_partitions, scale_strategy_partitions, strategy_partitions)
from resources import AcceleratorResource, EngineResource, PoolSourceResource, StorageResource


class PoolFeaturesConfig(dg.Config):
    """Which columns pool_features computes."""

    strategies: list[str] = []  # the columns these strategies read (`run` passes its own); empty: every column


@dg.asset(partitions_def=scale_partitions, group_name=Group.FILTERING, code_version="4", pool="gpu",
          deps=[Asset.POOL_METADATA,
                *(dg.AssetDep(a, partition_mapping=on_synthetic_web)
                  for a in (Asset.SCORER_MODELS, Asset.EVAL_SUITE, Asset.CURATED_SOURCE))])
def pool_features(context: dg.AssetExecutionContext, config: PoolFeaturesConfig, storage: StorageResource,
                  accelerator: AcceleratorResource, pool_source: PoolSourceResource,
                  engine: EngineResource) -> dg.MaterializeResult:
    """Per-sample columns the filters beyond the metadata read: caption concepts and repeats, k-means clusters and
    the target clusters, SemDeDup similarities, density-pruning quotas, VAS, NormSim, negCLIPLoss and HYPE scores,
    MetaCLIP keep probabilities. Metadata only: no image. With `strategies` in its config, only the columns they
    read; without, every column the inputs allow.

    The npz embeddings are read only for the columns computed from them. Where the metadata has no npz (DataComp's
    download_upstream.py fetches them only with --download_npz), strategies that read such a column fail here at
    once, naming them and the way to get the files; without `strategies`, those columns are left out.

    At a published pool, the inputs the paper's methods need (ImageNet's L/14 embeddings, VAS's targets,
    MetaCLIP's entries, HYPE's heads) are files named in the scale's configuration; a column whose file is not
    configured is left out (a rule reading it then names the file), and a configured file that is missing fails
    at once. At the synthetic web, HYPE's heads are trained here on the curated source."""
    from datacomp_assets.core.published import files_without_npz, npz_advice
    from datacomp_assets.core.uid_index import metadata_parquet
    from datacomp_assets.filtering.features import (
        EMBEDDING_COLUMNS, IMAGE_BASED_CAPTIONS, TEXT_COLUMNS, FeatureSettings, compute_pool_features,
        embedding_readers, feature_columns, missing_embeddings, reads_hype, vocabulary_from_classnames)
    from datacomp_assets.filtering.selection import rows_where
    from datacomp_assets.filtering.image_based import proportional_k

    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        source = pool_source.for_scale(scale, layout)
        t0 = time.perf_counter()
        metadata_dir = layout.pool_metadata(scale.name)
        pool_version = verified_values_version(metadata_dir, REDO.format(f"{Asset.POOL_METADATA} ({scale.name})"))
        columns = (frozenset(feature_columns(set().union(*map(strategy_identifiers, config.strategies))))
                   if config.strategies else None)
        parquets = metadata_parquet(metadata_dir)
        lacking = files_without_npz(parquets)
        no_npz = []
        if lacking:  # before anything long: a rule that needs the embeddings fails now, naming them
            readers = embedding_readers(config.strategies)
            advice = npz_advice(scale.name, lacking[0].resolve().parent)  # the user's folder, where linked
            if readers:
                raise FileNotFoundError(f"{Asset.POOL_FEATURES} ({scale.name}): " + missing_embeddings(
                    readers, lacking, len(parquets), advice))
            if columns is None:
                columns = frozenset(TEXT_COLUMNS)
                no_npz = [f"{', '.join(EMBEDDING_COLUMNS)} and HYPE's (the metadata has no npz: {advice})"]
        inputs = (feature_inputs_of_published(scale) if source.metadata_published
                  else feature_inputs_of_miniature(scale, layout, accelerator, context.log.info,
                                                   hype=columns is None or any(map(reads_hype, columns))))
        n_pool = _parquet_rows(metadata_dir)
        settings = FeatureSettings(
            vocabulary=vocabulary_from_classnames(inputs["classnames"]), metaclip_entries=inputs["metaclip_entries"],
            metaclip_t=scale.metaclip_t, clusters=min(n_pool, scale.kmeans_clusters or proportional_k(n_pool)),
            seed=scale.seed, kmeans_max_points=scale.kmeans_max_points, columns=columns)
        out = layout.pool_features(scale.name)
        # the image-based baseline clusters only captions that pass its caption terms (fastText on demand)
        # (called only when image_based's clusters are computed again, not when they are kept)
        def captioned():
            return rows_where(metadata_dir, IMAGE_BASED_CAPTIONS,
                              caption_features=caption_feature_store(context, layout, scale, source, engine))

        # each method its own folder, kept while its inputs are those recorded; the tasks on the engine
        summary = compute_pool_features(metadata_dir, out, settings, inputs["target_embeddings"],
                                        inputs["vas_targets"], context.log.info, hype_heads=inputs["hype_heads"],
                                        captioned=captioned, engine=engine.engine(), processes=source.processes,
                                        metadata_version=pool_version)
        left_out = inputs["left_out"] + no_npz
        if left_out:
            context.log.warning("left out: " + "; ".join(left_out))
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), **summary,
            "left_out": dg.MetadataValue.md("\n".join(f"- {m}" for m in left_out) or "nothing"),
            "asked_for": ", ".join(config.strategies) or "every column",
            "target_images": _target_rows(inputs["target_embeddings"]),
            **inputs.get("hype_training", {}),
            "text_vocabulary": len(settings.vocabulary), "seconds": round(time.perf_counter() - t0, 1)})


def _target_rows(targets) -> int:
    """Rows of the target embeddings: an array (the miniature's) or a user's .npy file (its header only)."""
    if targets is None:
        return 0
    return len(targets) if isinstance(targets, np.ndarray) else np.load(targets, mmap_mode="r").shape[0]


def feature_inputs_of_miniature(scale, layout, accelerator: AcceleratorResource, log=print, hype: bool = True) -> dict:
    """The miniature's stand-ins: the ImageNet analogue's class names and training images (embedded by the L/14
    scorer), MetaCLIP entries from the curated source's captions, and HYPE's heads trained on the curated source's
    L/14 embeddings (where `hype`: a HYPE column is asked for)."""
    from datacomp_assets.core.models import Scorer, load_model
    from datacomp_assets.core.scorers import SCORER_MODELS, scorer_checkpoint
    from datacomp_assets.core.shards import iter_webdataset
    from datacomp_assets.filtering.features import entries_from_captions
    from datacomp_assets.world.eval_suite import OBJECTS_TASK, objects_training_images

    classnames = [c for c in (layout.eval_suite(scale.name) / OBJECTS_TASK / "classnames.txt").read_text().split("\n")
                  if c]
    curated = [(files["jpg"], files["txt"].decode()) for tar in sorted(layout.curated_source(scale.name).glob("*.tar"))
               for _, files in iter_webdataset(tar) if "txt" in files and "jpg" in files]
    device = accelerator.placement(scale.precision).device
    checkpoint = scorer_checkpoint(layout, scale, "l14")
    l14 = Scorer("l14", *load_model(SCORER_MODELS["l14"], checkpoint, device), device)
    images, _ = zip(*objects_training_images(scale.target_images_per_class))
    targets, _ = l14.embed(list(images), [""] * len(images))
    heads, hype_training = None, {}
    if hype:  # trained again only when what they are trained from changed (else pool_features' HYPE is kept)
        heads, record = layout.hype_heads(scale.name), layout.hype_heads_record(scale.name)
        key = text_sha256([file_sha256(checkpoint), [text for _, text in curated], HYPE_MINIATURE, scale.seed])
        if not (heads.exists() and record.exists() and json.loads(record.read_text()).get("key") == key):
            curated_images = [(Image.open(io.BytesIO(jpg)).convert("RGB"), text) for jpg, text in curated]
            heads, hype_training = train_hype_heads(l14, curated_images, heads, scale.seed, log)
            replace_atomically(lambda tmp: tmp.write_text(json.dumps({"key": key})), record)
    return {"classnames": classnames, "target_embeddings": targets, "vas_targets": targets, "left_out": [],
            "metaclip_entries": entries_from_captions([text for _, text in curated], min_count=5, extra=classnames),
            "hype_heads": heads, "hype_training": hype_training}


# The miniature's heads: a 128-d hyperbolic space, 500 steps of 512 pairs (25 passes over the 10,000 curated pairs;
# about 20 s on one core).
HYPE_MINIATURE = {"d_out": 128, "steps": 500, "batch_size": 512}


def train_hype_heads(l14, curated: list, path: Path, seed: int, log=print) -> tuple[Path, dict]:
    """HYPE's hyperbolic heads, trained with the MERU loss on the curated pairs' L/14 embeddings (the miniature's
    stand-in for HYPE's MERU model trained on high-quality pairs); written to `path`."""
    from datacomp_assets.filtering import hyperbolic

    t0 = time.perf_counter()
    images, texts = l14.embed([image for image, _ in curated], [text for _, text in curated])
    heads = hyperbolic.train_heads(images, texts, seed=seed, log=log, **HYPE_MINIATURE)
    path.parent.mkdir(parents=True, exist_ok=True)
    hyperbolic.save_heads(heads, path)
    return path, {"hype_heads_path": dg.MetadataValue.path(str(path)), "hype_curated_pairs": len(curated),
                  "hype_training_seconds": round(time.perf_counter() - t0, 1)}


def feature_inputs_of_published(scale) -> dict:
    """The user's files named in the scale's configuration, and ImageNet-1k's class names (open_clip ships them)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from datacomp_assets.core.inputs import INPUTS, input_path, require_input
    from datacomp_assets.filtering.metaclip import read_entries

    def load(name: str):
        if input_path(scale, name) is None:
            left_out.append(f"{', '.join(INPUTS[name].columns)} (set `{name}`: {INPUTS[name].what})")
            return None
        return require_input(scale, name)  # a configured file that is not there fails here, at once

    left_out: list[str] = []
    targets, vas_targets, entries = load("imagenet_embeddings"), load("vas_target_embeddings"), load("metaclip_entries")
    hype_heads = load("hype_heads")
    # the arrays as files: versioned by their size and time, read memory-mapped by the tasks (ImageNet's are 2 GB)
    return {"classnames": list(IMAGENET_CLASSNAMES), "left_out": left_out, "hype_heads": hype_heads,
            "target_embeddings": targets, "vas_targets": vas_targets,
            "metaclip_entries": None if entries is None else read_entries(entries)}


@dg.asset(partitions_def=scale_scorer_partitions, group_name=Group.FILTERING, code_version="2", pool="gpu",
          deps=[dg.AssetDep(Asset.POOL_SHARDS, partition_mapping=by_scale),
                dg.AssetDep(Asset.DFN_MODEL, partition_mapping=by_scale),
                dg.AssetDep(Asset.CAPTIONER_MODEL, partition_mapping=by_scale),
                dg.AssetDep(Asset.SCORER_MODELS, partition_mapping=by_scale)])
def image_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                 accelerator: AcceleratorResource, engine: EngineResource) -> dg.MaterializeResult:
    """A model's score of every downloaded image with its caption: the DFN's cosine (`dfn`), the L/14 cosine with
    the image's text masked (`tmars`) or of the flipped image (`flipped`), SIEVE's match between the alt-text and
    the captioner's captions of the image (`sieve`, with the best caption in `generated_caption`). The filtering
    inputs that need pixels, so only the strategies that read them wait for the download.

    One parquet per pool shard (uid + `<scorer>_score`); a shard already scored is kept (resume). On a Ray cluster
    (the `engine` resource), groups of shards are Ray tasks, each loading the models once, on a GPU where the
    cluster has them."""
    from datacomp_assets.filtering.image_scores import ScoringModels, score_on_engine

    with storage.writing(context):
        scale, scorer = scale_and_scorer(context)
        layout, on = storage.layout, engine.engine()
        model_name, checkpoint = scoring_model(scale, layout, SCORER_MODEL[scorer])
        device = accelerator.placement(scale.precision, on).device
        out = layout.image_scores(scale.name, scorer)
        shards, column = layout.pool_shards(scale.name), image_score_column(scorer)
        metadata = {"model": model_name, "checkpoint_path": str(checkpoint)}
        captioner_name, captioner_checkpoint = scoring_model(scale, layout, "captioner") if scorer == "sieve" \
            else ("", "")
        if scorer == "sieve":
            metadata.update(captioner=captioner_name, captioner_checkpoint_path=str(captioner_checkpoint))
        models = ScoringModels(scorer, column, model_name, str(checkpoint), device, captioner_name,
                               str(captioner_checkpoint), seed=scale.seed)
        context.log.info(f"{column}: scoring on {on.describe()} ({device})")
        summary = score_on_engine(shards, out, models, on, engine.task_gpus(device), context.log.info)
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(out)), **metadata, **summary})


@dg.asset(partitions_def=scale_partitions, group_name=Group.FILTERING, code_version="1", pool="gpu",
          deps=[Asset.POOL_SHARDS, Asset.POOL_METADATA, Asset.CAPTIONER_MODEL, Asset.SCORER_MODELS])
def recaptioned_source(context: dg.AssetExecutionContext, storage: StorageResource,
                       accelerator: AcceleratorResource, pool_source: PoolSourceResource,
                       engine: EngineResource) -> dg.MaterializeResult:
    """The pool's images with the captioner's captions, one each, as a bring-your-own-data source with uids of its own
    (`external_sources/recaptioned/`; `pool_uid` names the pool image), and the L/14 score of each image with its
    generated caption (`clip_l14_similarity_score`), so a rule with `source = "recaptioned"` can filter them.
    Recaptioning, the bring-your-own-data track's leading method (Nguyen et al. 2023).

    At a published pool the score's image side is the metadata's own L/14 embedding (its npz's `l14_img`), so only
    the captions are embedded; metadata without it fails at once, naming the file and how to fetch it. On a Ray
    cluster (the `engine` resource), groups of shards are Ray tasks, on a GPU where the cluster has them."""
    import duckdb

    from datacomp_assets.core.published import npz_advice
    from datacomp_assets.core.uid_index import metadata_parquet
    from datacomp_assets.filtering.recaption import (
        IMAGE_EMBEDDINGS, RecaptionModels, files_without_image_embeddings, recaption_on_engine)

    with storage.writing(context):
        scale, layout, on = get_scale(context.partition_key), storage.layout, engine.engine()
        metadata_dir = layout.pool_metadata(scale.name)
        published = pool_source.for_scale(scale, layout).metadata_published
        if published:  # before any model loads: the images' embeddings are the metadata's
            parquets = metadata_parquet(metadata_dir)
            lacking = files_without_image_embeddings(parquets)
            if lacking:
                raise FileNotFoundError(
                    f"{Asset.RECAPTIONED_SOURCE} ({scale.name}): scores each image with its generated caption from "
                    f"the metadata's L/14 image embeddings ({IMAGE_EMBEDDINGS}), but {len(lacking)} of the "
                    f"{len(parquets)} metadata files have none beside them (e.g. {lacking[0].with_suffix('.npz')}). "
                    + npz_advice(scale.name, lacking[0].resolve().parent))
        l14_name, l14_checkpoint = scoring_model(scale, layout, "l14")
        captioner_name, captioner_checkpoint = scoring_model(scale, layout, "captioner")
        device = accelerator.placement(scale.precision, on).device
        models = RecaptionModels(captioner_name, str(captioner_checkpoint), l14_name, str(l14_checkpoint), device,
                                 scale.seed)
        out = layout.external_source(scale.name, RECAPTIONED_SOURCE)
        context.log.info(f"recaptioning on {on.describe()} ({device}); image embeddings "
                         + ("from the metadata's npz" if published else f"by {l14_name}"))
        summary = recaption_on_engine(layout.pool_shards(scale.name), out, metadata_dir, models, published, on,
                                      engine.task_gpus(device), context.log.info)
        examples = duckdb.sql(f"select alt_text, caption, clip_l14_similarity_score from "
                              f"read_parquet('{out}/*.parquet') order by uid limit 8").fetchall()
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), "captioner": captioner_name,
            "captioner_checkpoint_path": str(captioner_checkpoint), "scorer": l14_name,
            "image_embeddings": f"the metadata's {IMAGE_EMBEDDINGS}" if published else l14_name, **summary,
            "examples": dg.MetadataValue.md("| alt-text | generated caption | L/14 score |\n|---|---|---|\n" + "\n".join(
                f"| {_cell(a)} | {_cell(c)} | {s:.3f} |" for a, c, s in examples))})


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def scoring_model(scale, layout, model: str) -> tuple[str, Path]:
    """(architecture, checkpoint) of a scoring model: `dfn`, the data filtering network, `captioner`, SIEVE's
    captioner, or `l14`, the CLIP behind the `clip_l14_*` columns. Trained here at the synthetic web; the user's
    file at a published pool."""
    from datacomp_assets.core.inputs import require_input
    from datacomp_assets.core.scorers import (
        CAPTIONER_MODEL, DFN_MODEL, SCORER_MODELS, captioner_checkpoint, dfn_checkpoint, scorer_checkpoint)

    if scale.pool_source == "synthetic_web":
        trained = {"dfn": lambda: (DFN_MODEL, dfn_checkpoint(layout, scale)),
                   "captioner": lambda: (CAPTIONER_MODEL, captioner_checkpoint(layout, scale)),
                   "l14": lambda: (SCORER_MODELS["l14"], scorer_checkpoint(layout, scale, "l14"))}
        return trained[model]()
    name = {"dfn": "dfn", "captioner": "captioner", "l14": "clip_l14"}[model]  # its settings' prefix
    return getattr(scale, f"{name}_architecture"), require_input(scale, f"{name}_checkpoint")


@dg.observable_source_asset(partitions_def=strategy_partitions, group_name=Group.FILTERING)
def strategy_definitions() -> dg.DataVersionsByPartition:
    """Each strategy's rule (strategies.toml, $DATACOMP_STRATEGIES and the paper's sweeps), versioned by its hash.

    Edit a rule, reload the code location and observe this asset: that strategy's subsets, checkpoints and
    scores show as stale, and no other strategy's do."""
    return dg.DataVersionsByPartition({name: dg.DataVersion(strategy_version(name)) for name in PARTITIONED})


@dg.asset(partitions_def=scale_strategy_partitions, group_name=Group.FILTERING,
          deps=[STRATEGY_DEFINITION,
                dg.AssetDep(Asset.POOL_METADATA, partition_mapping=by_scale),
                dg.AssetDep(Asset.POOL_FEATURES, partition_mapping=by_scale),
                dg.AssetDep(Asset.IMAGE_SCORES, partition_mapping=reading_image_scores),
                dg.AssetDep(Asset.EXTERNAL_SOURCES, partition_mapping=by_scale),
                dg.AssetDep(Asset.RECAPTIONED_SOURCE, partition_mapping=by_scale)],
          code_version="4")
def subset(context: dg.AssetExecutionContext, storage: StorageResource,
           pool_source: PoolSourceResource, engine: EngineResource) -> dg.MaterializeResult:
    """The strategy's rule applied to the pool metadata: the uids a CLIP will be trained on, and an audit of
    who is in and who is out."""
    from datacomp_assets.filtering.audit import audit_markdown, audit_subset

    with storage.writing(context):
        scale, strategy = scale_and_strategy(context)
        layout = storage.layout
        source = pool_source.for_scale(scale, layout)
        metadata_dir = layout.pool_metadata(scale.name)
        # the files it reads are the version it records, and hold the values that were checked when written
        pool_version = verified_values_version(metadata_dir, REDO.format(f"{Asset.POOL_METADATA} ({scale.name})"))
        features = verify_tables_read(layout, scale.name, strategy, pool_version)
        t0 = time.perf_counter()
        scored = [layout.image_scores(scale.name, scorer) for scorer in IMAGE_SCORERS]
        feature_dirs = [*features, *(d for d in scored if d.exists())]  # each pool_features method its own table
        store = caption_feature_store(context, layout, scale, source, engine)
        uids = select_uids(metadata_dir, strategy, seed=scale.seed, feature_dirs=feature_dirs,
                           reference_scorers=source.reference_scorers,
                           external_dirs=layout.external_source_dirs(scale.name), caption_features=store)
        seconds = time.perf_counter() - t0
        path = layout.subset_file(scale.name, strategy)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_subset(uids, path)
        audit = audit_subset(metadata_dir, uids, ground_truth_path=source.ground_truth(),
                             language_dir=store.group_dir("fasttext"))
        overall = audit["overall"][0]
        subset_sha256 = file_sha256(path)
        write_lineage(path.parent, {"subset_sha256": subset_sha256, "strategy": strategy,
                                    "strategy_version": strategy_version(strategy), "pool_version": pool_version,
                                    "dataset_size": len(uids), "code_revision": code_revision()})
        return dg.MaterializeResult(data_version=dg.DataVersion(subset_sha256[:16]), metadata={
            "path": dg.MetadataValue.path(str(path)), "subset_sha256": subset_sha256, "pool_version": pool_version,
            "strategy_version": strategy_version(strategy),
            "strategy": get_strategy(strategy).description,
            "rule": dg.MetadataValue.json(strategy_definition(strategy)),
            "track": track(strategy),
            "dataset_size": len(uids),
            "unique_uids": overall["kept_unique"],
            "pool_size": overall["pool"],
            "kept_fraction": overall["kept_share"],
            "audit": dg.MetadataValue.md(audit_markdown(audit)),
            "seconds": round(seconds, 2),
            **{f"caption_features_{c['group']}_rows": c["rows"] for c in store.computed},
        })


# What a refused table's message says to do: its writer, materialized again, redoes the files that fail the check.
REDO = "Materialize {} again: it computes again (at a published pool, checks again) the files that fail this check."


def verify_tables_read(layout, scale: str, strategy: str, pool_version: str | None = None) -> list[Path]:
    """The tables of per-sample values beside the metadata that the strategy's rule reads are those their writers
    recorded (or, where none was recorded, hold valid values): a file that is not is named before any is read.
    Returns pool_features' method folders to join: those recorded for this pool (`pool_version`)."""
    reads = strategy_identifiers(strategy)
    features = pool_feature_dirs(layout, scale, reads, pool_version)
    tables = {**{d: f"{Asset.POOL_FEATURES} ({scale})" for d in features},
              **{layout.image_scores(scale, scorer): f"{Asset.IMAGE_SCORES} ({scale}|{scorer})"
                 for scorer in IMAGE_SCORERS if image_score_column(scorer) in reads}}
    # The external sources whose writers record a manifest (the recaptioned source, the miniature's noisy one); a
    # url list's download is resumed shard by shard, so materializing it again would not fetch a bad file again.
    for name, directory in layout.external_source_dirs(scale).items():
        if name in sources_read(strategy) and "manifest" in table_record(directory):
            writer = Asset.RECAPTIONED_SOURCE if name == RECAPTIONED_SOURCE else Asset.EXTERNAL_SOURCES
            tables[directory] = f"{writer} ({scale})"
    for directory, asset in tables.items():
        if directory.exists():
            verify_table(directory, REDO.format(asset))
    return features


def pool_feature_dirs(layout, scale: str, reads: set[str], pool_version: str | None) -> list[Path]:
    """The method folders of pool_features recorded for this pool. One that a rule reading `reads` would join but
    that is not (unrecorded: a run cut short; of other metadata; the single-folder layout of before) is refused,
    named."""
    from datacomp_assets.filtering.features import METADATA_VERSION, feature_columns

    redo = REDO.format(f"{Asset.POOL_FEATURES} ({scale})")
    read = feature_columns(reads)
    root = layout.pool_features(scale)
    old = sorted(root.glob("*.parquet")) if root.exists() else []
    if old and read:
        raise ValueError(f"{root}: {old[0].name} and {len(old) - 1} more files are pool_features' single-folder "
                         f"layout of before, which is no longer read (each method has its folder now). {redo}")
    usable = []
    for directory in layout.pool_features_methods(scale):
        try:
            record = table_record(directory)
        except ValueError:
            record = {}
        if "manifest" in record and (pool_version is None or record.get(METADATA_VERSION) == pool_version):
            usable.append(directory)
            continue
        files = sorted(directory.glob("*.parquet"))
        if files and read & set(pq.read_schema(files[0]).names):
            why = ("was not recorded (a run cut short)" if "manifest" not in record
                   else "was computed from other metadata than the pool's")
            raise ValueError(f"{directory} {why}; {', '.join(sorted(read))} would be read from it. {redo}")
    return usable


def caption_feature_store(context, layout, scale, source, engine: EngineResource) -> CaptionFeatureStore:
    """Where the caption features a published pool's metadata lacks are computed, when a rule first reads them."""
    return CaptionFeatureStore(layout.caption_features(scale.name), engine=engine.engine(),
                               processes=source.processes, log=context.log.info)


def _uid_array(query: str) -> np.ndarray:
    """The sorted uids of a DuckDB query, from Arrow's buffers (12.8M uids as Python strings would take 2 GB)."""
    import duckdb

    return sort_uids(arrow_uids_to_array(duckdb.sql(query).to_arrow_table().column("uid").combine_chunks()))


def _scored_in_pool(scores_dir, metadata_dir) -> int:
    import duckdb

    return duckdb.sql(f"select count(*) from read_parquet('{scores_dir}/*.parquet') s semi join "
                      f"read_parquet('{metadata_dir}/*.parquet') m using (uid)").fetchall()[0][0]


def _parquet_rows(directory) -> int:
    import duckdb

    return duckdb.sql(f"select count(*) from read_parquet('{directory}/*.parquet')").fetchall()[0][0]


@dg.asset_check(asset=subset, blocking=True,
                description="A non-empty subset of the pool (and its declared sources), of the rule's size, "
                            "with no near-duplicate of an evaluation image")
def subset_is_valid(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    scale, strategy = scale_and_strategy(context)
    layout = storage.layout
    uids = unique_sorted(load_subset(layout.subset_file(scale.name, strategy)))
    metadata_dir = layout.pool_metadata(scale.name)

    pool = _uid_array(f"select uid from read_parquet('{metadata_dir}/*.parquet')")
    allowed = pool
    for source, directory in layout.external_source_dirs(scale.name).items():
        if source in sources_read(strategy):
            allowed = union_sorted(allowed, _uid_array(
                f"select uid from read_parquet('{directory}/*.parquet') where status = 'success'"))
    outside = int((~isin_sorted(uids, allowed)).sum())
    removed_dir = layout.removed_samples(scale.name)
    eval_duplicates = _uid_array(
        f"select uid from read_parquet('{removed_dir}/*.parquet') where reason = 'eval_duplicate'"
    ) if any(removed_dir.glob("*.parquet")) else np.empty(0, uids.dtype)
    held_eval = int(isin_sorted(uids, eval_duplicates).sum())
    in_pool = int(isin_sorted(uids, pool).sum())
    # A model's image scores exist only for the images that downloaded: its share is of those still in the pool
    # (the safety steps removed some after the download).
    scored = [layout.image_scores(scale.name, scorer) for scorer in IMAGE_SCORERS
              if image_score_column(scorer) in strategy_identifiers(strategy)]
    denominator = _scored_in_pool(scored[0], metadata_dir) if scored else len(pool)
    fraction = in_pool / denominator if denominator else 0.0
    expected = expected_fraction(strategy)
    size_ok = expected is None or abs(fraction - expected) <= 0.01 + 0.01 * expected
    return dg.AssetCheckResult(
        passed=bool(len(uids) > 0 and outside == 0 and held_eval == 0 and size_ok),
        metadata={"unique_uids": len(uids), "uids_outside_pool_and_sources": outside,
                  "eval_near_duplicates": held_eval, "kept_fraction": fraction,
                  "expected_fraction": expected if expected is not None else "data-dependent"},
    )
