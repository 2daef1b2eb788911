"""The evaluation stage: suite layout, metric functions, and resumable checkpoint evaluation."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.evaluation import noise, zeroshot
from datacomp_assets.evaluation.zeroshot import (
    summarize, classification_logits, classification_metrics, evaluate_checkpoint, iter_shard_samples,
    retrieval_metrics, zero_shot_classifier,
)
from datacomp_assets.world.eval_suite import OBJECTS, POSITIONS, TASKS, build_suite

SCALE = 0.05  # a miniature suite: a few images per class
TINY_MODEL = "datacomp-tiny"  # the smallest registered architecture; randomly initialised here
# DataComp's task groups (reference section 5), which the leaderboard averages by.
REFERENCE_GROUPS = ("ImageNet", "ImageNet distribution shifts", "VTAB", "Retrieval", "other")
SHIFTS = [k for k, t in TASKS.items() if t.group == "ImageNet distribution shifts"]
CAPTIONS_PER_IMAGE = {"retrieval": (2, 3), "retrieval_coco": (5, 5)}  # Flickr30k-like, MSCOCO-like


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return root, build_suite(root, size_scale=SCALE)


# ---------------------------------------------------------------- suite layout

def test_suite_has_clip_benchmark_layout(suite):
    root, counts = suite
    assert set(counts) == set(TASKS)
    for key, task in TASKS.items():
        task_dir = root / key
        nshards = int((task_dir / "test" / "nshards.txt").read_text())
        assert nshards >= 1 and all((task_dir / "test" / f"{i}.tar").exists() for i in range(nshards))
        with tarfile.open(task_dir / "test" / "0.tar") as tar:
            names = tar.getnames()
        target_ext = ".cls" if task.kind == "classification" else ".txt"
        assert names[0].endswith(".jpg") and names[1] == names[0].replace(".jpg", target_ext)
        samples = list(iter_shard_samples(task_dir))
        assert len(samples) == counts[key] > 0
        Image.open(io.BytesIO(samples[0]["jpg"])).verify()
        if task.kind == "classification":
            classnames = (task_dir / "classnames.txt").read_text().splitlines()
            templates = (task_dir / "zeroshot_classification_templates.txt").read_text().splitlines()
            assert classnames == list(task.classnames)
            assert templates and all("{c}" in t for t in templates)
            labels = [int(s["cls"]) for s in samples]
            # Balanced: every class present, equally often.
            per_class = [labels.count(c) for c in range(len(classnames))]
            assert min(per_class) == max(per_class) >= 1
        else:
            low, high = CAPTIONS_PER_IMAGE[key]
            for s in samples:
                captions = s["txt"].decode().split("\n")
                assert low <= len(captions) <= high and len(set(captions)) == len(captions)


def test_groups_mirror_the_reference():
    groups: dict[str, list[str]] = {}
    for key, task in TASKS.items():
        groups.setdefault(task.group, []).append(key)
    assert set(groups) == set(REFERENCE_GROUPS)
    assert groups["ImageNet"] == ["objects"]
    assert len(SHIFTS) >= 3 and "objects_sketch" in SHIFTS
    # A shift asks the ImageNet analogue's question (same classes, same prompts) of other images.
    assert all(TASKS[k].classnames == TASKS["objects"].classnames == OBJECTS for k in SHIFTS)
    assert all(TASKS[k].templates == TASKS["objects"].templates for k in SHIFTS)
    assert len(groups["VTAB"]) >= 5 and {"counting", "colors"} <= set(groups["VTAB"])
    assert sorted(groups["Retrieval"]) == ["retrieval", "retrieval_coco"]
    assert all(TASKS[k].kind == "retrieval" and TASKS[k].main_metric == "mean_recall@1" for k in groups["Retrieval"])
    assert groups["other"] == ["digits"] and TASKS["digits"].main_metric == "mean_per_class_recall"
    for key in set(TASKS) - set(groups["Retrieval"]):
        assert TASKS[key].kind == "classification" and len(set(TASKS[key].classnames)) >= 2


@pytest.mark.parametrize("key", [k for k, t in TASKS.items() if t.kind == "classification"])
def test_classification_tasks_are_balanced_and_deterministic(key):
    # Larger than SCALE, so that every class has several images and an imbalance would show.
    first = list(TASKS[key].builder(0.12))
    labels = [label for _, label in first]
    per_class = np.bincount(labels, minlength=len(TASKS[key].classnames))
    assert len(per_class) == len(TASKS[key].classnames) and per_class.min() == per_class.max() >= 2
    again = list(TASKS[key].builder(0.12))
    assert len(again) == len(first)
    for (image, label), (image2, label2) in zip(first, again):
        assert label == label2 and np.array_equal(np.asarray(image), np.asarray(image2))


def _thumbnails(task_dir) -> np.ndarray:
    """(n, 16, 16, 3) thumbnails in [0, 1]: about equal for the same picture whatever its JPEG bytes."""
    return np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB").resize((16, 16), Image.BOX),
                                dtype=np.float32) / 255 for s in iter_shard_samples(task_dir)])


@pytest.mark.parametrize("key", SHIFTS)
def test_shifted_tasks_share_no_image_with_objects_or_each_other(suite, key):
    """A shift is new images: none of `objects` (nor of another shift), not even re-encoded."""
    root, _ = suite
    shifted = _thumbnails(root / key)
    for other in ["objects"] + [k for k in SHIFTS if k != key]:
        assert not {s["jpg"] for s in iter_shard_samples(root / other)} & {
            s["jpg"] for s in iter_shard_samples(root / key)}
        # A re-encoded copy differs by about 0.005 per pixel; distinct pictures by far more.
        distance = np.abs(shifted[:, None] - _thumbnails(root / other)[None]).mean(axis=(2, 3, 4))
        assert distance.min() > 0.02, other


def test_position_labels_say_where_the_object_is(suite):
    root, _ = suite
    for s in iter_shard_samples(root / "position"):
        pixels = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.int16)
        ys, xs = np.nonzero(np.abs(pixels - 250).max(axis=-1) > 60)  # ink on the plain paper
        dx, dy = xs.mean() - pixels.shape[1] / 2, ys.mean() - pixels.shape[0] / 2
        side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
        assert side == POSITIONS[int(s["cls"])]


def test_build_suite_is_idempotent(suite):
    root, counts = suite
    shard = root / "objects" / "test" / "0.tar"
    before = shard.stat().st_mtime_ns
    assert build_suite(root, size_scale=SCALE) == counts
    assert shard.stat().st_mtime_ns == before
    assert not list(root.glob("*.tmp"))


def test_build_suite_rebuilds_other_scale(tmp_path):
    small = build_suite(tmp_path, tasks=["retrieval"], size_scale=0.01)
    larger = build_suite(tmp_path, tasks=["retrieval"], size_scale=0.02)
    assert larger["retrieval"] > small["retrieval"]
    assert len(list(iter_shard_samples(tmp_path / "retrieval"))) == larger["retrieval"]


# ---------------------------------------------------------------- metrics on hand-made scores

def test_classification_metrics_known_answers():
    # 6 classes, 4 images: labels 0, 0, 1, 2.
    logits = torch.tensor([
        [9., 1, 0, 0, 0, 0],   # right
        [1., 9, 0, 0, 0, 0],   # wrong; true class ranked 2nd
        [0., 9, 1, 0, 0, 0],   # right
        [9., 8, 7, 6, 5, -1],  # wrong; true class ranked 3rd
    ])
    labels = torch.tensor([0, 0, 1, 2])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(1.0)
    # Per-class recall: class 0 -> 1/2, class 1 -> 1, class 2 -> 0.
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_acc5_is_null_below_five_classes():
    """wds_eval.py writes acc5 = None (JSON null) with fewer than 5 classes; accuracies are hits / n in float64."""
    m = classification_metrics(torch.eye(4), torch.arange(4))
    assert list(m) == ["acc1", "acc5", "mean_per_class_recall"] and m["acc5"] is None
    assert m["acc1"] == 1.0 and m["mean_per_class_recall"] == 1.0
    assert json.dumps(m) == '{"acc1": 1.0, "acc5": null, "mean_per_class_recall": 1.0}'
    thirds = classification_metrics(torch.eye(3)[[0, 0, 1]], torch.tensor([0, 1, 1]))
    assert thirds["acc1"] == 2 / 3  # exactly, not float32's 0.6666666865348816


def test_retrieval_metrics_known_answers():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2. scores[text, image].
    scores = torch.tensor([
        [0.9, 0.1, 0.0],  # -> image 0, right
        [0.2, 0.8, 0.0],  # -> image 1, wrong
        [0.1, 0.7, 0.0],  # -> image 1, right
        [0.5, 0.0, 0.4],  # -> image 0, wrong
    ])
    m = retrieval_metrics(scores, torch.tensor([0, 0, 1, 2]))
    assert m["image_retrieval_recall@1"] == pytest.approx(0.5)
    # Best caption per image: image 0 -> caption 0 (right), image 1 -> caption 1 (wrong),
    # image 2 -> caption 3 (right).
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["mean_recall@1"] == pytest.approx((0.5 + 2 / 3) / 2)


class OneHotModel(torch.nn.Module):
    """Text features: the one-hot of the class named first in the prompt (plus a per-template wobble);
    image features: the one-hot of the pixel value. A classifier built from it must classify perfectly."""

    def encode_text(self, tokens):
        classes, wobble = tokens[:, 0], tokens[:, 1].float()
        return F.one_hot(classes, 8).float() * (1 + wobble[:, None])

    def encode_image(self, images):
        return F.one_hot(images[:, 0].long(), 8).float()


def test_zero_shot_classifier_is_clip_benchmarks():
    """Per class: the normalised mean of the normalised prompt embeddings, stacked as (dim, classes)."""
    classnames, templates = ["0", "3", "5"], ["{c} 0", "{c} 2"]
    tokenizer = lambda texts: torch.tensor([[int(w) for w in t.split()] for t in texts])  # noqa: E731
    classifier = zero_shot_classifier(OneHotModel(), tokenizer, classnames, templates, "cpu")
    assert classifier.shape == (8, 3) and classifier.dtype == torch.float32
    assert torch.allclose(classifier, F.one_hot(torch.tensor([0, 3, 5]), 8).float().T)
    labels = torch.tensor([0, 1, 2, 2])
    images = torch.tensor([[0], [3], [5], [5]])
    logits = classification_logits(OneHotModel(), classifier, [images[:3], images[3:]], "cpu")
    m = classification_metrics(logits, labels)
    assert m["acc1"] == m["mean_per_class_recall"] == 1.0 and m["acc5"] is None


# ---------------------------------------------------------------- checkpoint evaluation

def test_evaluate_checkpoint_writes_and_resumes(suite, tmp_path, monkeypatch):
    root, _ = suite
    out = tmp_path / "eval_results.jsonl"
    messages = []
    samples = tmp_path / "eval_samples.npz"
    rows = evaluate_checkpoint(TINY_MODEL, None, root, out, batch_size=64, progress=messages.append,
                               samples_file=samples)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # Every task kept the per-sample outcomes its main metric is recomputed from (evaluation noise).
    outcomes = noise.read_outcomes(samples)
    assert set(outcomes) == set(TASKS)
    for row in lines:
        outcome = outcomes[row["key"]]
        observed = noise.metric_on(outcome, np.arange(noise.sample_count(outcome))[None])[0]
        assert observed == pytest.approx(row["metrics"]["main_metric"], rel=1e-6), row["key"]
    summary = noise.noise_summary(outcomes, list(TASKS), n_resamples=200)
    average = np.mean([r["metrics"]["main_metric"] for r in lines])
    assert summary["average"]["low"] < average < summary["average"]["high"]
    assert [r["key"] for r in lines] == list(TASKS) == [r["key"] for r in rows]
    for row in lines:
        task = TASKS[row["key"]]
        assert row["dataset"] == row["key"] and row["group"] == task.group
        assert 0.0 <= row["metrics"]["main_metric"] <= 1.0
        assert row["metrics"]["main_metric"] == row["metrics"][task.main_metric]
    assert all("mean_recall@1" in r["metrics"] for r in lines if TASKS[r["key"]].kind == "retrieval")
    assert messages

    summary = summarize(rows)
    assert set(summary) == set(REFERENCE_GROUPS) | {"average"}
    assert summary["average"] == pytest.approx(sum(r["metrics"]["main_metric"] for r in rows) / len(rows))
    vtab = [r["metrics"]["main_metric"] for r in rows if r["group"] == "VTAB"]
    assert summary["VTAB"] == pytest.approx(sum(vtab) / len(vtab))

    # A rerun recomputes nothing: neither the model nor any task is touched.
    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed a finished task")

    monkeypatch.setattr(zeroshot, "evaluate_task", must_not_run)
    monkeypatch.setattr("datacomp_assets.core.models.load_model", must_not_run)
    assert evaluate_checkpoint(TINY_MODEL, None, root, out) == rows
    assert len(out.read_text().splitlines()) == len(TASKS)


def test_evaluate_checkpoint_resumes_after_crash(suite, tmp_path, monkeypatch):
    """Only tasks without a complete line are evaluated; a cut-short last line is ignored."""
    root, _ = suite
    out = tmp_path / "eval_results.jsonl"
    done = [{"key": k, "dataset": k, "group": TASKS[k].group, "metrics": {"main_metric": 0.5}}
            for k in list(TASKS)[:-1]]
    last = list(TASKS)[-1]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"key": "' + last[:3])
    evaluated = []

    def fake_evaluate_task(task, *args, **kwargs):
        evaluated.append(task.key)
        return {task.main_metric: 0.25, "main_metric": 0.25}

    monkeypatch.setattr(zeroshot, "evaluate_task", fake_evaluate_task)
    monkeypatch.setattr("datacomp_assets.core.models.load_model", lambda *a, **k: (None, None, None))
    rows = evaluate_checkpoint(TINY_MODEL, None, root, out)
    assert evaluated == [last]
    assert [r["key"] for r in rows] == list(TASKS)
    assert [r["key"] for r in zeroshot.read_results(out).values()] == list(TASKS)
