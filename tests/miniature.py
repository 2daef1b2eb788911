"""The miniature `tiny` configuration the end-to-end tests run at (400 samples, two seeds)."""

from dataclasses import replace

from datacomp_assets.core.scales import SCALES

MINIATURE = replace(SCALES["tiny"], pool_size=400, samples_seen=256, global_batch=64, epochs=1, warmup=2,
                    shard_size=200, curated_size=256, scorer_samples_seen=128, eval_suite_scale=0.04,
                    target_images_per_class=4, metaclip_t_override=20, seeds=(0, 1))

# A 400-pair rehearsal of a paper scale, declared in a user's scale file: the published code path over a mirror of
# the loopback web (`mirror`, beside the file), the miniature's recipe. Tests append what else they need.
REHEARSAL_SCALE = """
[rehearsal]
inherit = "tiny"
pool_source = "published"
pool_size = 400
samples_seen = 256
global_batch = 64
epochs = 1
warmup = 2
shard_size = 200
seeds = [0]
mirror_dir = "mirror"
"""
