"""The model-loading steps on the engine (image_scores, recaptioned_source, eval_results): what the engine's tasks
write equals what one process wrote before, file for file; each task loads its models once; a task retried after
its worker died keeps what it had written whole; and recaptioning at a published pool reads the npz's L/14 image
embeddings (and fails at once, naming the file and --download_npz, where there are none)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datacomp_assets.core import models as core_models
from datacomp_assets.core.engine import Engine, process_cache
from datacomp_assets.core.layout import Layout
from datacomp_assets.core.models import Scorer, load_model
from datacomp_assets.core.scales import SCALES
from datacomp_assets.core.scorers import CAPTIONER_MODEL, RECAPTIONED_SOURCE, SCORER_MODELS
from datacomp_assets.evaluation import noise
from datacomp_assets.evaluation.on_engine import CheckpointToScore, GroupTask, evaluate_group, evaluate_on_engine
from datacomp_assets.evaluation.zeroshot import evaluate_checkpoint
from datacomp_assets.filtering.image_scores import (
    ScoringModels, ScoringTask, image_preparation, score_on_engine, score_shards, score_task, write_shard_scores)
from datacomp_assets.filtering.recaption import (
    RecaptionModels, files_without_image_embeddings, npz_rows, pool_rows, recaption_on_engine,
    write_recaptioned_source)
from datacomp_assets.filtering.sieve import SieveScoring, generated_captions, shard_seed
from datacomp_assets.world.eval_suite import TASKS, build_suite
from tests.test_sieve import _write_shard
from tests.test_upstream_dir import resources_at, scale_at, upstream  # noqa: F401 (a fixture)

L14 = SCORER_MODELS["l14"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Seeded random weights of the L/14 stand-in, the captioner and the evaluated model, saved as a user's files."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, arch in (("l14", L14), ("captioner", CAPTIONER_MODEL), ("clip", "datacomp-tiny")):
        torch.manual_seed(0)
        model, _, _ = load_model(arch)
        paths[name] = root / f"{name}.pt"
        torch.save({"state_dict": model.state_dict()}, paths[name])
    return paths


@pytest.fixture
def shards(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    texts = ["a red circle", "a photo of two stars", "x", "three green tees", "stock photo", "a blue ring"]
    for k in range(3):
        _write_shard(directory / f"{k:08d}.tar", [f"{10 * k + i:032x}" for i in range(k + 2)], texts[:k + 2], k)
    return directory


def _files(directory: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


def _count_loads(monkeypatch) -> list[str]:
    loads = []
    real = core_models.load_model

    def counted(name, *args, **kwargs):
        loads.append(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(core_models, "load_model", counted)
    return loads


@pytest.mark.parametrize("scorer", ["flipped", "sieve"])
def test_image_scores_on_the_engine_equal_one_process_file_for_file(scorer, checkpoints, shards, tmp_path,
                                                                     monkeypatch):
    l14 = Scorer("l14", *load_model(L14, checkpoints["l14"]))
    column = f"{scorer}_score"
    if scorer == "sieve":  # as the asset scored before the engine: the models loaded once, shard after shard
        captioner, preprocess, tokenizer = load_model(CAPTIONER_MODEL, checkpoints["captioner"])
        write_shard_scores(shards, tmp_path / "before", column,
                           SieveScoring(captioner, tokenizer, preprocess, l14.embed_text, seed=5),
                           log=lambda _: None)
    else:
        score_shards(shards, tmp_path / "before", l14, column, log=lambda _: None, prepare=image_preparation(scorer))
    models = ScoringModels(scorer, column, L14, str(checkpoints["l14"]), "cpu", CAPTIONER_MODEL,
                           str(checkpoints["captioner"]) if scorer == "sieve" else "", seed=5)
    loads = _count_loads(monkeypatch)
    summary = score_on_engine(shards, tmp_path / "after", models, Engine(), log=lambda _: None)
    assert summary["shards"] == 3 and summary["images_scored"] == 2 + 3 + 4 and summary["shards_skipped"] == 0
    assert len(loads) == (2 if scorer == "sieve" else 1)  # once for the three shards
    before = _files(tmp_path / "before", "*.parquet")
    assert len(before) == 3 and _files(tmp_path / "after", "*.parquet") == before
    assert sorted(p.name for p in (tmp_path / "after").iterdir()) == [*before, "_manifest.json"]  # no temporary

    # Resumed: only the missing shard is scored, to the same bytes.
    (tmp_path / "after" / "00000001.parquet").unlink()
    again = score_on_engine(shards, tmp_path / "after", models, Engine(), log=lambda _: None)
    assert again["shards_skipped"] == 2 and again["images_scored"] == 3
    assert _files(tmp_path / "after", "*.parquet") == before


def test_a_retried_scoring_task_keeps_the_shards_its_first_try_wrote(checkpoints, shards, tmp_path):
    """As Ray retries a task whose worker died after it renamed its first shard into place (before the step
    recorded a manifest): that shard is kept as it is and counted, the others are written."""
    models = ScoringModels("dfn", "dfn_score", L14, str(checkpoints["l14"]))
    out = tmp_path / "out"
    out.mkdir()
    tars = tuple(str(p) for p in sorted(shards.glob("*.tar")))
    score_task(ScoringTask(tars[:1], str(out), models))
    first = (out / "00000000.parquet").stat().st_mtime_ns
    assert score_task(ScoringTask(tars, str(out), models)) == [("00000000", 2), ("00000001", 3), ("00000002", 4)]
    assert (out / "00000000.parquet").stat().st_mtime_ns == first
    uids = [u for p in sorted(out.glob("*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    assert len(uids) == len(set(uids)) == 9


def test_process_cache_loads_again_when_the_checkpoint_is_rewritten(tmp_path):
    from datacomp_assets.core.engine import clear_process_cache, file_key

    path = tmp_path / "model.pt"
    path.write_bytes(b"one")
    loads = []
    for _ in range(2):
        process_cache(("m", file_key(path)), lambda: loads.append(1))
    path.write_bytes(b"two!")  # another size: another key
    process_cache(("m", file_key(path)), lambda: loads.append(1))
    clear_process_cache()
    assert len(loads) == 2


def test_task_groups_keep_one_shard_a_task_here():
    assert Engine().task_groups([1, 2, 3], gpus=1) == [[1], [2], [3]]
    assert Engine().task_slots(1) == 1


# ---------------------------------------------------------------- recaptioning


def _metadata(directory: Path, uids: list[str], files: int = 2, npz_width: int | None = None,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Published-like metadata: uid (and text) parquet files, with an npz of `l14_img` beside each if asked."""
    directory.mkdir(parents=True)
    rng, embeddings = np.random.default_rng(seed), {}
    for f, part in enumerate(np.array_split(np.array(uids), files)):
        pq.write_table(pa.table({"uid": pa.array(part.tolist(), pa.string()), "text": ["t"] * len(part)}),
                       directory / f"{f:08d}.parquet")
        if npz_width:
            rows = rng.standard_normal((len(part), npz_width)).astype(np.float16)
            np.savez(directory / f"{f:08d}.npz", l14_img=rows, l14_txt=rows)
            embeddings.update(zip(part.tolist(), rows))
    return embeddings


def _recaption_models(checkpoints) -> RecaptionModels:
    return RecaptionModels(CAPTIONER_MODEL, str(checkpoints["captioner"]), L14, str(checkpoints["l14"]), seed=3)


def test_recaptioning_on_the_engine_equals_one_process_file_for_file(checkpoints, shards, tmp_path, monkeypatch):
    uids = [f"{10 * k + i:032x}" for k in range(3) for i in range(k + 2)]
    removed = uids[3]
    _metadata(tmp_path / "metadata", [u for u in uids if u != removed])
    l14 = Scorer("l14", *load_model(L14, checkpoints["l14"]))
    captioner, preprocess, tokenizer = load_model(CAPTIONER_MODEL, checkpoints["captioner"])

    def caption(shard):  # the asset's closures before the engine
        return lambda images: [c[0] for c in generated_captions(captioner, tokenizer, preprocess, images, 1,
                                                                shard_seed(3, shard))]

    def score(images, captions):
        image, text = l14.embed(images, captions)
        return (image * text).sum(axis=1)

    write_recaptioned_source(shards, tmp_path / "before", lambda batch: np.array([u != removed for u in batch]),
                             caption, score, log=lambda _: None)
    loads = _count_loads(monkeypatch)
    summary = recaption_on_engine(shards, tmp_path / "after", tmp_path / "metadata", _recaption_models(checkpoints),
                                  published=False, log=lambda _: None)
    assert len(loads) == 2 and summary["images_recaptioned"] == len(uids) - 1
    for pattern in ("*.parquet", "*.tar"):
        before = _files(tmp_path / "before", pattern)
        assert len(before) == 3 and _files(tmp_path / "after", pattern) == before, pattern
    assert removed not in pq.read_table(tmp_path / "after" / "00000001.parquet")["pool_uid"].to_pylist()


def test_recaptioning_at_a_published_pool_reads_the_npz_image_embeddings(checkpoints, shards, tmp_path,
                                                                          monkeypatch):
    uids = [f"{10 * k + i:032x}" for k in range(3) for i in range(k + 2)]
    embeddings = _metadata(tmp_path / "metadata", uids[::-1], files=3, npz_width=768)  # rows in another order

    def no_image_tower(*args, **kwargs):
        raise AssertionError("an image embedding was computed")
    monkeypatch.setattr(Scorer, "embed", no_image_tower)
    recaption_on_engine(shards, tmp_path / "out", tmp_path / "metadata", _recaption_models(checkpoints),
                        published=True, log=lambda _: None)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))).to_pandas()
    assert sorted(table.pool_uid) == sorted(uids)
    l14 = Scorer("l14", *load_model(L14, checkpoints["l14"]))
    for shard, rows in table.groupby(table.key.str[:8]):
        image = np.stack([embeddings[u] for u in rows.pool_uid]).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        expected = (image * l14.embed_text(list(rows.caption))).sum(axis=1)
        np.testing.assert_allclose(rows.clip_l14_similarity_score, expected, rtol=1e-5, atol=1e-6)


def test_npz_rows_are_read_from_the_file_without_loading_the_array(tmp_path):
    a = np.arange(40, dtype=np.float16).reshape(10, 4)
    np.savez(tmp_path / "stored.npz", l14_img=a)
    np.savez_compressed(tmp_path / "compressed.npz", l14_img=a)
    for name in ("stored.npz", "compressed.npz"):
        assert np.array_equal(npz_rows(tmp_path / name, "l14_img", np.array([7, 0, 3])), a[[7, 0, 3]])
    with pytest.raises(ValueError, match="has no 'l14_txt' array"):
        npz_rows(tmp_path / "stored.npz", "l14_txt", np.array([0]))
    (tmp_path / "a.parquet").touch()
    (tmp_path / "stored.parquet").touch()
    assert files_without_image_embeddings([tmp_path / "a.parquet", tmp_path / "stored.parquet"]) == \
        [tmp_path / "a.parquet"]


def test_pool_rows_invert_the_rank_in_chunks():
    rank = np.random.default_rng(0).permutation(1000)
    wanted = np.array([5, 999, 0, 512])
    assert np.array_equal(pool_rows(rank, wanted, chunk=64), [np.flatnonzero(rank == p)[0] for p in wanted])


def test_recaptioning_a_published_pool_without_its_npz_fails_at_once_naming_it(upstream, tmp_path,  # noqa: F811
                                                                               monkeypatch, checkpoints):
    from datacomp_assets.filtering.assets import recaptioned_source
    from datacomp_assets.metadata.assets import pool_metadata
    from datacomp_assets.pool.assets import pool_index

    scale = replace(scale_at(upstream["parquet_only"], tmp_path), clip_l14_architecture=L14,
                    clip_l14_checkpoint=str(checkpoints["l14"]), captioner_architecture=CAPTIONER_MODEL,
                    captioner_checkpoint=str(checkpoints["captioner"]))
    monkeypatch.setitem(SCALES, "small", scale)
    resources = resources_at(tmp_path / "data")
    assert dg.materialize([pool_index, pool_metadata], partition_key="small", resources=resources).success
    loads = _count_loads(monkeypatch)
    result = dg.materialize([recaptioned_source], partition_key="small", resources=resources, raise_on_error=False)
    assert not result.success and not loads  # before any model loaded
    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "recaptioned_source (small)" in message and "l14_img" in message and ".npz" in message
    assert f"--data_dir {upstream['parquet_only']} --download_npz" in message
    assert not Layout(tmp_path / "data").external_source("small", RECAPTIONED_SOURCE).exists()


def test_recaptioning_a_published_pool_with_its_npz_never_runs_the_image_tower(upstream, tmp_path,  # noqa: F811
                                                                               monkeypatch, checkpoints):
    """Through Dagster at the user's data dir (download_upstream.py --download_npz): every downloaded image is
    recaptioned, scored against the metadata's own l14_img."""
    from datacomp_assets.filtering.assets import recaptioned_source
    from datacomp_assets.metadata.assets import pool_metadata
    from datacomp_assets.pool.assets import pool_index

    scale = replace(scale_at(upstream["full"], tmp_path), clip_l14_architecture=L14,
                    clip_l14_checkpoint=str(checkpoints["l14"]), captioner_architecture=CAPTIONER_MODEL,
                    captioner_checkpoint=str(checkpoints["captioner"]))
    monkeypatch.setitem(SCALES, "small", scale)
    resources = resources_at(tmp_path / "data")
    assert dg.materialize([pool_index, pool_metadata], partition_key="small", resources=resources).success

    def no_image_tower(*args, **kwargs):
        raise AssertionError("an image embedding was computed")
    monkeypatch.setattr(Scorer, "embed", no_image_tower)
    assert dg.materialize([recaptioned_source], partition_key="small", resources=resources).success
    out = Layout(tmp_path / "data").external_source("small", RECAPTIONED_SOURCE)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    downloaded = sum(s == "success" for p in sorted((upstream["full"] / "shards").glob("*.parquet"))
                     for s in pq.read_table(p, columns=["status"])["status"].to_pylist())
    assert table.num_rows == downloaded > 0


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    build_suite(root, size_scale=0.05)
    return root


def _checkpoint_files(directory: Path, checkpoint: Path) -> CheckpointToScore:
    return CheckpointToScore(checkpoint, directory / "eval_results.jsonl", directory / "eval_samples.npz",
                             lambda group: directory / f".part_{group.replace(' ', '_')}.jsonl", "seed 0")


def test_evaluation_on_the_engine_equals_one_process_file_for_file(suite, checkpoints, tmp_path, monkeypatch):
    evaluate_checkpoint("datacomp-tiny", checkpoints["clip"], suite, tmp_path / "before" / "eval_results.jsonl",
                        samples_file=tmp_path / "before" / "eval_samples.npz")
    groups = {t.group for t in TASKS.values()}
    assert len(groups) > 2
    loads = _count_loads(monkeypatch)
    after = _checkpoint_files(tmp_path / "after", checkpoints["clip"])
    notes = []
    lines = evaluate_on_engine("datacomp-tiny", [after], suite, TASKS, task_done=lambda n, note: notes.append(n))
    assert len(loads) == 1  # one load for every group of the checkpoint, in this process
    assert notes == list(range(1, len(TASKS) + 1))
    assert after.results.read_bytes() == (tmp_path / "before" / "eval_results.jsonl").read_bytes()
    assert [r["key"] for r in lines[0]] == list(TASKS)
    before_outcomes = noise.read_outcomes(tmp_path / "before" / "eval_samples.npz")
    after_outcomes = noise.read_outcomes(after.samples)
    assert list(after_outcomes) == list(before_outcomes)
    for key, fields in before_outcomes.items():
        assert fields.keys() == after_outcomes[key].keys()
        assert all(np.array_equal(v, after_outcomes[key][f]) for f, v in fields.items()), key
    assert sorted(p.name for p in after.results.parent.iterdir()) == ["eval_results.jsonl", "eval_samples.npz"]


def test_a_retried_evaluation_task_rewrites_its_part_and_a_whole_part_is_kept(suite, checkpoints, tmp_path,
                                                                              monkeypatch):
    """A group's part already whole (its task's first try renamed it into place, then the step stopped) is kept:
    only the other groups are scored, and the merged file is the same."""
    evaluate_checkpoint("datacomp-tiny", checkpoints["clip"], suite, tmp_path / "before" / "eval_results.jsonl")
    after = _checkpoint_files(tmp_path / "after", checkpoints["clip"])
    after.results.parent.mkdir()
    group = TASKS[next(iter(TASKS))].group
    mine = tuple(t for t in TASKS.values() if t.group == group)
    task = GroupTask("datacomp-tiny", str(checkpoints["clip"]), str(suite), mine, str(after.part(group)))
    part, rows = evaluate_group(task)
    assert [r["key"] for r in rows] == [t.key for t in mine] and Path(part).exists()
    assert evaluate_group(task) == (part, rows)  # a second try keeps the whole part
    scored = []
    real = evaluate_checkpoint

    def counted(*args, **kwargs):
        scored.extend(kwargs["registry"])
        return real(*args, **kwargs)
    monkeypatch.setattr("datacomp_assets.evaluation.on_engine.evaluate_checkpoint", counted)
    evaluate_on_engine("datacomp-tiny", [after], suite, TASKS, log=lambda _: None)
    assert scored and not set(scored) & {t.key for t in mine}
    assert after.results.read_bytes() == (tmp_path / "before" / "eval_results.jsonl").read_bytes()
    assert not Path(part).exists()
    assert [json.loads(x)["key"] for x in after.results.read_text().splitlines()] == list(TASKS)


def test_eval_results_through_dagster_equal_one_process_and_a_rerun_scores_nothing(tmp_path, monkeypatch):
    """The asset on the miniature: each seed's eval_results.jsonl is what `evaluate_checkpoint` writes in one
    process; materialized again, no task is scored."""
    from datacomp_assets.definitions import RESOURCES, defs
    from resources import AcceleratorResource, EngineResource, StorageResource
    from tests.miniature import MINIATURE

    monkeypatch.setitem(SCALES, "tiny", MINIATURE)
    layout = Layout(tmp_path / "data")
    for seed in MINIATURE.seeds:
        torch.manual_seed(seed)
        path = layout.seed_checkpoint("tiny", "basic", seed, MINIATURE.epochs)
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": load_model(MINIATURE.model)[0].state_dict()}, path)
    resources = {**RESOURCES, "storage": StorageResource(root=str(tmp_path / "data")),
                 "accelerator": AcceleratorResource(device="cpu"), "engine": EngineResource()}
    assets = [defs.get_assets_def("eval_suite"), defs.get_assets_def("eval_results")]
    assert dg.materialize(assets, selection=["eval_suite"], partition_key="tiny", resources=resources).success
    assert dg.materialize(assets, selection=["eval_results"], partition_key="tiny|basic", resources=resources).success
    for seed in MINIATURE.seeds:
        reference = tmp_path / f"reference_{seed}.jsonl"
        evaluate_checkpoint(MINIATURE.model, layout.seed_checkpoint("tiny", "basic", seed, MINIATURE.epochs),
                            layout.eval_suite("tiny"), reference)
        assert layout.results_file("tiny", "basic", seed).read_bytes() == reference.read_bytes()
        assert sorted(p.name for p in layout.results_file("tiny", "basic", seed).parent.iterdir()) == [
            "eval_noise.json", "eval_results.jsonl", "eval_samples.npz"]  # no part left

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished task was scored again")
    monkeypatch.setattr("datacomp_assets.evaluation.on_engine.evaluate_checkpoint", must_not_run)
    assert dg.materialize(assets, selection=["eval_results"], partition_key="tiny|basic", resources=resources).success
