"""The miniature `tiny` configuration the end-to-end tests run at (400 samples, two seeds)."""

from dataclasses import replace

from datacomp_assets.core.scales import SCALES

MINIATURE = replace(SCALES["tiny"], pool_size=400, samples_seen=256, global_batch=64, epochs=1, warmup=2,
                    shard_size=200, curated_size=256, scorer_samples_seen=128, eval_suite_scale=0.04,
                    target_images_per_class=4, metaclip_t_override=20, seeds=(0, 1))
