"""Where every artifact lives: the one place that names the graph's assets and spells their paths.

An asset writes under `<root>/<scale>/<asset>/[<strategy>/]...` (the scaling analysis, across scales, under
`<root>/scaling_analysis/`). Asset bodies, checks, the command line and the tests ask a `Layout` (the storage
resource's `layout`) for a path; no other module spells an asset's name or an artifact's file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class Asset:
    """The graph's asset names: each asset's key, and the folder it writes under `<root>/<scale>/`."""

    STRATEGY_DEFINITIONS = "strategy_definitions"
    POOL_INDEX = "pool_index"
    POOL_SHARDS = "pool_shards"
    CURATED_SOURCE = "curated_source"
    EXTERNAL_SOURCES = "external_sources"
    SCORER_MODELS = "scorer_models"
    DFN_MODEL = "dfn_model"
    CAPTIONER_MODEL = "captioner_model"
    POOL_METADATA = "pool_metadata"
    POOL_FEATURES = "pool_features"
    IMAGE_SCORES = "image_scores"
    RECAPTIONED_SOURCE = "recaptioned_source"
    EVAL_SUITE = "eval_suite"
    SUBSET = "subset"
    CHECKPOINT = "checkpoint"
    EVAL_RESULTS = "eval_results"
    LEADERBOARD = "leaderboard"
    SCALING_ANALYSIS = "scaling_analysis"
    SUBMISSION = "submission"


class Group:
    """The UI's asset groups, one per stage."""

    POOL = "pool"
    METADATA = "metadata"
    FILTERING = "filtering"
    TRAINING = "training"
    EVALUATION = "evaluation"
    LEADERBOARD = "leaderboard"


# File names that writers below the stages (the synthetic world's index writer) share with the layout.
INDEX_FILE = "index.parquet"
GROUND_TRUTH_FILE = "ground_truth.parquet"
CAPTION_FEATURES_DIR = "caption_features"  # beside the assets: a cache the rules fill, not an asset
REMOVED_DIR = "removed"  # beside the pool metadata: what the safety steps removed, and why


def seed_name(seed: int) -> str:
    """The folder of one training seed's run, and its key in records and metadata."""
    return f"seed_{seed}"


def run_checkpoint_dir(logs_dir: Path, run_name: str) -> Path:
    """Where open_clip's trainer (`--logs logs_dir --name run_name`) saves a run's checkpoints."""
    return Path(logs_dir) / run_name / "checkpoints"


def run_checkpoint(logs_dir: Path, run_name: str, epoch: int) -> Path:
    """open_clip's checkpoint of a run after `epoch` "epochs" (checkpoint intervals)."""
    return run_checkpoint_dir(logs_dir, run_name) / f"epoch_{epoch}.pt"


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def asset_dir(self, scale: str, asset: str, strategy: str | None = None) -> Path:
        path = self.root / scale / asset
        return path / strategy if strategy else path

    def lock_file(self, asset: str, scale: str | None = None, strategy: str | None = None) -> Path:
        """The one-writer lock of an asset partition (`core.locks`)."""
        name = "__".join(part for part in (asset, strategy) if part)
        return (self.root / scale if scale else self.root) / ".locks" / f"{name}.lock"

    # ---------------------------------------------------------------- the pool

    def pool_index(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.POOL_INDEX)

    def pool_index_file(self, scale: str) -> Path:
        """img2dataset's input: uid, url, caption (and at the paper's scales face boxes and sha256)."""
        return self.pool_index(scale) / INDEX_FILE

    def ground_truth_file(self, scale: str) -> Path:
        """The synthetic pool's ground truth (no filter reads it)."""
        return self.pool_index(scale) / GROUND_TRUTH_FILE

    def published_metadata(self, scale: str) -> Path:
        """The published parquet (and npz) files of a paper scale, as fetched."""
        return self.pool_index(scale) / "metadata"

    def pool_shards(self, scale: str) -> Path:
        """img2dataset's shards of the pool: the scale's `shards_dir` where it names one (shards downloaded
        before, elsewhere), else under the root."""
        from datacomp_assets.core.scales import SCALES

        configured = SCALES.get(scale)
        if configured is not None and configured.shards_dir:
            return Path(configured.shards_dir)
        return self.asset_dir(scale, Asset.POOL_SHARDS)

    def curated_source(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.CURATED_SOURCE)

    def external_sources(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.EXTERNAL_SOURCES)

    def external_source(self, scale: str, name: str) -> Path:
        return self.external_sources(scale) / name

    def external_index_file(self, scale: str, name: str) -> Path:
        """A url list's rows with their uids, as img2dataset reads them."""
        return self.external_source(scale, name) / INDEX_FILE

    def external_shards(self, scale: str, name: str) -> Path:
        return self.external_source(scale, name) / "shards"

    def external_source_dirs(self, scale: str) -> dict[str, Path]:
        """Each bring-your-own-data source's shard folder, by name (a url list's shards are in its `shards/`,
        beside its index)."""
        root = self.external_sources(scale)
        folders = sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []
        return {d.name: d / "shards" if (d / "shards").is_dir() else d for d in folders}

    # ---------------------------------------------------------------- metadata and features

    def scorer_models(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.SCORER_MODELS)

    def dfn_model(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.DFN_MODEL)

    def captioner_model(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.CAPTIONER_MODEL)

    def pool_metadata(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.POOL_METADATA)

    def removed_samples(self, scale: str) -> Path:
        """Samples the safety steps took out of the pool, with the reason, one parquet per shard."""
        return self.pool_metadata(scale) / REMOVED_DIR

    def caption_features(self, scale: str) -> Path:
        """Caption features the metadata lacks (a published pool's), computed on demand by the rules that read them
        and kept for the next (`core.caption_features.CaptionFeatureStore`)."""
        return self.root / scale / CAPTION_FEATURES_DIR

    def pool_features(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.POOL_FEATURES)

    def hype_heads(self, scale: str) -> Path:
        """The miniature's HYPE heads (trained on the curated source's L/14 embeddings by pool_features)."""
        return self.asset_dir(scale, Asset.POOL_FEATURES).with_name("hype_model") / "heads.pt"

    def hype_heads_record(self, scale: str) -> Path:
        """Beside them: a key of what they were trained from (trained again only when it changes)."""
        return self.hype_heads(scale).with_name("heads.json")

    def pool_features_method(self, scale: str, method: str) -> Path:
        """One pool_features method's table (`<stem>.parquet` per metadata file) and its record of its inputs."""
        return self.pool_features(scale) / method

    def pool_features_methods(self, scale: str) -> list[Path]:
        """The method folders pool_features has written (a rule joins those it reads, on uid)."""
        root = self.pool_features(scale)
        return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))) \
            if root.exists() else []

    def image_scores(self, scale: str, scorer: str) -> Path:
        """A model's scores of the pool's downloaded images (uid + `<scorer>_score`), one parquet per shard."""
        return self.asset_dir(scale, Asset.IMAGE_SCORES) / scorer

    def eval_suite(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.EVAL_SUITE)

    def reference_eval_data(self) -> Path:
        """The default home of DataComp's 38 reference test sets (shared by the paper's scales)."""
        return self.root / "eval_data"

    # ---------------------------------------------------------------- per strategy

    def subset_dir(self, scale: str, strategy: str) -> Path:
        return self.asset_dir(scale, Asset.SUBSET, strategy)

    def subset_file(self, scale: str, strategy: str) -> Path:
        """The subset: sorted `u8,u8` uids, DataComp's submission format."""
        return self.subset_dir(scale, strategy) / "subset.npy"

    def checkpoint_dir(self, scale: str, strategy: str) -> Path:
        return self.asset_dir(scale, Asset.CHECKPOINT, strategy)

    def train_shards(self, scale: str, strategy: str) -> Path:
        return self.checkpoint_dir(scale, strategy) / "train_shards"

    def training_logs(self, scale: str, strategy: str) -> Path:
        """open_clip's `--logs`: one run per seed beneath, `<seed_name>/checkpoints/epoch_N.pt`."""
        return self.checkpoint_dir(scale, strategy) / "logs"

    def seed_checkpoint_dir(self, scale: str, strategy: str, seed: int) -> Path:
        return run_checkpoint_dir(self.training_logs(scale, strategy), seed_name(seed))

    def seed_checkpoint(self, scale: str, strategy: str, seed: int, epoch: int) -> Path:
        return run_checkpoint(self.training_logs(scale, strategy), seed_name(seed), epoch)

    def loss_curve(self, scale: str, strategy: str) -> Path:
        return self.checkpoint_dir(scale, strategy) / "loss_curve.png"

    def eval_results_dir(self, scale: str, strategy: str) -> Path:
        return self.asset_dir(scale, Asset.EVAL_RESULTS, strategy)

    def results_file(self, scale: str, strategy: str, seed: int) -> Path:
        """One seed's scores, in the reference's `eval_results.jsonl` format."""
        return self.eval_results_dir(scale, strategy) / seed_name(seed) / "eval_results.jsonl"

    def eval_samples_file(self, scale: str, strategy: str, seed: int) -> Path:
        """Beside it: the per-sample outcomes each task's main metric is computed from (evaluation/noise.py)."""
        return self.results_file(scale, strategy, seed).with_name("eval_samples.npz")

    def eval_noise_file(self, scale: str, strategy: str, seed: int) -> Path:
        """Beside it: the bootstrap intervals of the seed's scores, which the leaderboard reads."""
        return self.results_file(scale, strategy, seed).with_name("eval_noise.json")

    def eval_part_file(self, scale: str, strategy: str, seed: int, group: str) -> Path:
        """Beside it, until merged into it: one task group's lines, as one engine task wrote them (its samples in
        the same name with `.npz`). Hidden, so no reader of the seed's folder takes it for a result."""
        slug = "".join(c if c.isalnum() else "_" for c in group.lower())
        return self.results_file(scale, strategy, seed).with_name(f".part_{slug}.jsonl")

    def submission_dir(self, scale: str, strategy: str) -> Path:
        return self.asset_dir(scale, Asset.SUBMISSION, strategy)

    # ---------------------------------------------------------------- per scale and across scales

    def leaderboard_dir(self, scale: str) -> Path:
        return self.asset_dir(scale, Asset.LEADERBOARD)

    def leaderboard_markdown(self, scale: str) -> Path:
        return self.leaderboard_dir(scale) / "leaderboard.md"

    def leaderboard_json(self, scale: str) -> Path:
        return self.leaderboard_dir(scale) / "leaderboard.json"

    def run_log(self, scale: str, stamp: str) -> Path:
        """The full log of one `python -m datacomp_assets.run` (Dagster's events and whatever steps printed)."""
        return self.root / scale / "logs" / f"run-{stamp}.log"

    def scaling_analysis(self) -> Path:
        return self.root / Asset.SCALING_ANALYSIS
