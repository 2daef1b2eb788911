"""The benchmark's compute scales and each one's fixed configuration (reference section 1).

`tiny` is this project's miniature: the same formats and recipe, sized to run offline on a 2-core CPU.
The paper's scales are exactly the reference's; only the data changes between submissions.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    image_size: int           # img2dataset's download resize target
    shard_size: int           # samples per webdataset shard
    download_timeout: int = 10  # seconds img2dataset waits for a host
    weight_decay: float = 0.2
    beta1: float = 0.9
    eps: float = 1e-6
    seed: int = 0
    seeds: tuple[int, ...] = (0,)  # training seeds per subset; the leaderboard reports their mean and spread
    precision: str = "amp"    # on GPUs; the accelerator resource picks fp32 on a CPU
    pool_source: str = "published"  # where the pool comes from: "published" metadata or the "synthetic_web"
    eval_suite: str = "reference"   # "reference": DataComp's 38 tasks; "synthetic": the miniature's own suite
    curated_size: int = 0     # synthetic only: clean pairs the scorer CLIPs train on
    scorer_samples_seen: int = 0
    eval_suite_scale: float = 1.0  # synthetic only: size of the tiny evaluation suite (tests shrink it)
    metaclip_t_override: float = 0.0  # MetaCLIP's t (pairs kept per entry); 0: its 20,000 per 400M pairs, scaled
    target_images_per_class: int = 50  # synthetic only: training images of the ImageNet analogue per class

    @property
    def metaclip_t(self) -> float:
        """MetaCLIP's balancing threshold t: an entry matched by more pairs keeps about t of them."""
        return self.metaclip_t_override or 20_000 * self.pool_size / 400_000_000

    @property
    def steps(self) -> int:
        return -(-self.samples_seen // self.global_batch)

SCALES: dict[str, ScaleConfig] = {
    "tiny": ScaleConfig("tiny", pool_size=20_000, samples_seen=20_000, model="datacomp-tiny",
                        global_batch=256, lr=2e-3, warmup=20, beta2=0.98, epochs=2,
                        image_size=64, shard_size=2_000, download_timeout=2, precision="fp32",
                        pool_source="synthetic_web", eval_suite="synthetic",
                        curated_size=10_000, scorer_samples_seen=40_000, metaclip_t_override=500, seeds=(0, 1, 2)),
    "small": ScaleConfig("small", 12_800_000, 12_800_000, "ViT-B-32", 4096, 5e-4, 500, 0.98, 5, 512, 10_000),
    "medium": ScaleConfig("medium", 128_000_000, 128_000_000, "ViT-B-32", 4096, 5e-4, 500, 0.98, 8, 512, 10_000),
    "large": ScaleConfig("large", 1_280_000_000, 1_280_000_000, "ViT-B-16", 8192, 5e-4, 500, 0.98, 8, 512, 10_000),
    "xlarge": ScaleConfig("xlarge", 12_800_000_000, 12_800_000_000, "ViT-L-14", 90_112, 1e-3, 10_000, 0.95, 8,
                          512, 10_000, precision="amp_bf16"),
}


def get_scale(name: str) -> ScaleConfig:
    try:
        return SCALES[name]
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}") from None
