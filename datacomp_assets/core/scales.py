"""The benchmark's compute scales and each one's fixed configuration (reference section 1), as data.

The registry is `scales.toml` beside this file plus any files named in `$DATACOMP_SCALES` (os.pathsep-separated,
read by `settings`). `tiny` is this project's miniature: the same formats and recipe, sized to run offline on a
2-core CPU. The paper's scales are exactly the reference's: a user's file may point them at local files (the
published metadata's mirror, the downloaded shards, the inputs a method needs), never change their recipe. A
user's file changes `tiny`'s recipe only with `override = true` in its table, which changes the scale's version
(`scale_version`) and marks the leaderboard. Any other section declares a new scale (`inherit = "small"` starts
from another scale's settings), such as a 1% rehearsal of `small` on a workstation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from datacomp_assets.core import settings

REGISTRY_FILE = Path(__file__).with_name("scales.toml")
PAPER_SCALES = ("small", "medium", "large", "xlarge")
# The folders DataComp's download_upstream.py makes under its --data_dir (its --metadata_dir defaults to the first).
UPSTREAM_METADATA, UPSTREAM_SHARDS = "metadata", "shards"


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    pool_size: int            # candidate pool size
    samples_seen: int         # fixed training budget (== pool size in the paper's filtering track)
    model: str                # open_clip model name
    global_batch: int
    lr: float
    warmup: int               # steps
    beta2: float
    epochs: int               # open_clip's "epochs": checkpoint intervals of the fixed budget, not passes over data
    image_size: int = 512     # img2dataset's download resize target
    shard_size: int = 10_000  # samples per webdataset shard
    download_timeout: int = 10  # seconds img2dataset waits for a host
    weight_decay: float = 0.2
    beta1: float = 0.9
    eps: float = 1e-6
    seed: int = 0
    seeds: tuple[int, ...] = (0,)  # training seeds per subset; the leaderboard reports their mean and spread
    precision: str = "amp"    # on GPUs; the accelerator resource picks fp32 on a CPU
    # Devices: the reference splits the global batch over this many GPUs; with fewer, gradients accumulate.
    reference_gpus: int = 1
    requires_gpu: bool = True  # training on a CPU is refused unless the accelerator resource opts in
    pool_source: str = "published"  # where the pool comes from: "published" metadata or the "synthetic_web"
    eval_suite: str = "reference"   # "reference": DataComp's 38 tasks; "synthetic": the miniature's own suite
    cron_schedule: str = "0 3 * * 6"  # when the scale's schedule (stopped until turned on) requests every strategy
    # ---- published pools: where the files are (empty: the defaults named in docs/scales.md)
    # DataComp's download_upstream.py --data_dir: its metadata/ is the mirror and its shards/ the shards, as they are
    data_dir: str = ""
    mirror_dir: str = ""      # the published parquet + npz; empty: <data_dir>/metadata, $DATACOMP_MIRROR, the Hub
    shards_dir: str = ""      # img2dataset's shards of this pool; empty: <data_dir>/shards, <root>/<scale>/pool_shards
    # ---- inputs the paper's methods need and this project cannot ship (see core/inputs.py)
    imagenet_embeddings: str = ""    # .npy: L/14 image embeddings of ImageNet-1k training images (image_based)
    vas_target_embeddings: str = ""  # .npy: VAS's target embeddings; empty: imagenet_embeddings
    metaclip_entries: str = ""       # .json list or .txt lines: MetaCLIP's metadata entries
    dfn_checkpoint: str = ""         # open_clip checkpoint of a data filtering network
    dfn_architecture: str = "ViT-B-32"  # its open_clip architecture
    clip_l14_checkpoint: str = ""    # open_clip checkpoint of OpenAI's CLIP ViT-L/14 (T-MARS, flipped, SIEVE)
    clip_l14_architecture: str = "ViT-L-14"
    captioner_checkpoint: str = ""   # open_clip checkpoint of a CoCa captioner (SIEVE)
    captioner_architecture: str = "coca_ViT-L-14"
    hype_heads: str = ""             # HYPE's hyperbolic heads over the L/14 embeddings (filtering/hyperbolic.py)
    kmeans_clusters: int = 0         # image_based and SemDeDup k-means; 0: the reference's (100,000; scaled at tiny)
    # k-means trains on a seeded sample of at most this many rows: 1.8 GB of float32 at 768-d, so memory does not
    # grow with the pool (the reference trains on every row, on GPUs with the memory for it)
    kmeans_max_points: int = 600_000
    # ---- the synthetic web only
    curated_size: int = 0     # clean pairs the scorer CLIPs train on
    scorer_samples_seen: int = 0
    eval_suite_scale: float = 1.0  # size of the tiny evaluation suite (tests shrink it)
    metaclip_t_override: float = 0.0  # MetaCLIP's t (pairs kept per entry); 0: its 20,000 per 400M pairs, scaled
    target_images_per_class: int = 50  # training images of the ImageNet analogue per class
    # A user's file changed this built-in scale's recipe on purpose (`override = true`; never a paper scale's)
    override: bool = False

    @property
    def metaclip_t(self) -> float:
        """MetaCLIP's balancing threshold t: an entry matched by more pairs keeps about t of them."""
        return self.metaclip_t_override or 20_000 * self.pool_size / 400_000_000

    @property
    def steps(self) -> int:
        return -(-self.samples_seen // self.global_batch)


# What a user's file may set on one of the paper's scales: where things are, not how the model is trained.
LOCATION_FIELDS = frozenset({"data_dir", "mirror_dir", "shards_dir", "imagenet_embeddings", "vas_target_embeddings",
                             "metaclip_entries", "dfn_checkpoint", "dfn_architecture", "reference_gpus",
                             "clip_l14_checkpoint", "clip_l14_architecture", "hype_heads",
                             "captioner_checkpoint", "captioner_architecture",
                             "download_timeout", "seeds", "cron_schedule",
                             "kmeans_max_points"})
PATH_FIELDS = ("data_dir", "mirror_dir", "shards_dir", "imagenet_embeddings", "vas_target_embeddings",
               "metaclip_entries", "dfn_checkpoint", "clip_l14_checkpoint", "hype_heads", "captioner_checkpoint")
_FIELDS = {f.name: f for f in fields(ScaleConfig)}
_SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _scale_from(name: str, spec: Mapping, base: ScaleConfig | None, where: str) -> ScaleConfig:
    unknown = set(spec) - set(_FIELDS) - {"inherit"}
    if unknown:
        raise ValueError(f"{where}: [{name}] has unknown settings {sorted(unknown)}; known: {sorted(_FIELDS)}")
    values = {k: v for k, v in spec.items() if k != "inherit"}
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    for key in PATH_FIELDS:  # relative paths in a user's file are relative to that file
        if values.get(key):
            values[key] = str((Path(where).parent / os.path.expanduser(values[key])).resolve())
    if values.get("data_dir"):  # download_upstream.py's layout, unless the same table names a folder itself
        values.setdefault("mirror_dir", str(Path(values["data_dir"]) / UPSTREAM_METADATA))
        values.setdefault("shards_dir", str(Path(values["data_dir"]) / UPSTREAM_SHARDS))
    try:
        scale = replace(base, name=name, **values) if base else ScaleConfig(name=name, **values)
    except TypeError as err:
        raise ValueError(f"{where}: [{name}] {err}") from None
    for key, value in values.items():
        expected = _SIMPLE_TYPES.get(_FIELDS[key].type)
        if expected and not isinstance(value, expected) or isinstance(value, bool) and expected in (int, float):
            raise ValueError(f"{where}: [{name}] {key} must be {_FIELDS[key].type}, not {value!r}")
    if scale.pool_source not in ("synthetic_web", "published"):
        raise ValueError(f"{where}: [{name}] pool_source must be 'synthetic_web' or 'published', "
                         f"not {scale.pool_source!r}")
    if scale.eval_suite not in ("synthetic", "reference"):
        raise ValueError(f"{where}: [{name}] eval_suite must be 'synthetic' or 'reference', not {scale.eval_suite!r}")
    if min(scale.pool_size, scale.samples_seen, scale.global_batch, scale.epochs, scale.reference_gpus) < 1:
        raise ValueError(f"{where}: [{name}] pool_size, samples_seen, global_batch, epochs and reference_gpus "
                         "must be positive")
    return scale


def parse_scales(table: Mapping, where: str, registry: Mapping[str, ScaleConfig],
                 builtin: Collection[str] = ()) -> dict[str, ScaleConfig]:
    """Scales from a TOML table (`[name]` sections); errors name the file and the scale. The `builtin` scales'
    recipes are the project's: a user's file may change `tiny`'s only with `override = true`, and never a paper
    scale's."""
    from datacomp_assets.core.strategies import NAME_PATTERN

    out: dict[str, ScaleConfig] = {}
    for name, spec in table.items():
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{where}: scale name {name!r} must be lowercase letters, digits and _")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: [{name}] must be a table of settings")
        known = {**registry, **out}
        if name in PAPER_SCALES and name in known:
            fixed = sorted(set(spec) - LOCATION_FIELDS)
            if fixed:
                raise ValueError(
                    f"{where}: [{name}] may not change {fixed}: the paper's recipes are fixed by the benchmark. "
                    f"Declare a scale of your own instead (e.g. [my_{name}] with inherit = \"{name}\").")
        override = spec.get("override", False)
        if not isinstance(override, bool):
            raise ValueError(f"{where}: [{name}] override must be true or false, not {override!r}")
        recipe = sorted(set(spec) - LOCATION_FIELDS - {"override"})
        if name in builtin and recipe and not override:
            raise ValueError(
                f"{where}: [{name}] changes the built-in scale's recipe ({recipe}): declare a scale of your own "
                f"instead ([my_{name}] with inherit = \"{name}\"), or add `override = true` to [{name}] to change "
                "it on purpose (its version changes and the leaderboard marks it)")
        if override and name not in builtin:
            raise ValueError(f"{where}: [{name}] sets `override = true`, but {name!r} is not a built-in scale; "
                             "remove that line (a scale of your own needs no marker)")
        base = known.get(name)
        if "inherit" in spec:
            if spec["inherit"] not in known:
                raise ValueError(f"{where}: [{name}] inherits unknown scale {spec['inherit']!r}; "
                                 f"known: {', '.join(known)}")
            base = known[spec["inherit"]]
        scale = _scale_from(name, spec, base, where)
        # Marked once overridden, whatever later files amend; a scale inheriting from it is the user's own.
        override = override or (name in builtin and base is not None and base.name == name and base.override)
        out[name] = replace(scale, override=override)
    return out


def scale_version(scale: ScaleConfig) -> str:
    """A short hash of the scale's recipe: every setting except its name and where its files are (those a user may
    set on any scale). Each checkpoint records it, so the leaderboard can tell a model trained under another recipe;
    an override is part of it, so an overridden scale never shares the built-in's version."""
    recipe = {f.name: getattr(scale, f.name) for f in fields(ScaleConfig)
              if f.name != "name" and f.name not in LOCATION_FIELDS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def load_registry(extra_files: Sequence[str | os.PathLike] = ()) -> dict[str, ScaleConfig]:
    """The shipped scales plus those declared (or pointed at local files) in `extra_files`."""
    registry: dict[str, ScaleConfig] = {}
    builtin: tuple[str, ...] = ()  # the shipped file's scales, once it is read
    for path in (REGISTRY_FILE, *extra_files):
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"scale file {path} does not exist (named in $DATACOMP_SCALES?)") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        registry.update(parse_scales(table, str(path.resolve()), registry, builtin))
        builtin = builtin or tuple(registry)
    return registry


SCALES: dict[str, ScaleConfig] = load_registry(settings.scale_files())


def get_scale(name: str) -> ScaleConfig:
    try:
        return SCALES[name]
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)} "
                         f"(or declare it in a file named by $DATACOMP_SCALES)") from None
