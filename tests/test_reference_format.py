"""Results lines key for key as DataComp's evaluate.py writes them, tar member keys as webdataset splits them, and
Hub images handed to the transform in their own mode: each expected value below is worked out from the reference's
code (eval_utils/wds_eval.py, wilds_eval.py, retr_eval.py, wino_eval.py, clip_benchmark 1.4.0, wilds 2.0)."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
from datacomp_assets.core.shards import iter_webdataset, sample_key_and_extension
from datacomp_assets.evaluation import noise, zeroshot
from datacomp_assets.evaluation.reference_metrics import winogavil_metrics, winogavil_outcome

F32_TWO_THIRDS = float(np.float32(2) / np.float32(3))  # WILDS's float32 means: 0.6666666865348816
N_CLASSES = 8


class OneHotModel(torch.nn.Module):
    """Text: the one-hot of the number a prompt starts with; image: the one-hot of the class its pixels show."""

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], N_CLASSES).float()

    def encode_image(self, images):
        return F.one_hot(images[:, 0].long(), N_CLASSES).float()


def tokenizer(texts):
    return torch.tensor([[int(text.split()[0])] for text in texts])


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.tensor([image.convert("RGB").getpixel((0, 0))[0] // 16])


def png(shown: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (16 * shown, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_task(task_dir, samples: list[dict[str, bytes]], classnames=None):
    """A clip_benchmark webdataset folder: test/0.tar (members <key>.<ext>), nshards, classnames, templates."""
    (task_dir / "test").mkdir(parents=True)
    (task_dir / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(task_dir / "test" / "0.tar", "w") as tar:
        for i, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if classnames:
        (task_dir / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (task_dir / "zeroshot_classification_templates.txt").write_text("{c} photo\n{c} picture\n")
    return task_dir


def npy(row) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, dtype=np.int64))
    return buf.getvalue()


def line_of(task_key, task_dir, outcomes=None):
    task = REFERENCE_TASKS[task_key]
    metrics = zeroshot.evaluate_task(task, task_dir, OneHotModel(), preprocess, tokenizer, batch_size=2,
                                     outcomes=outcomes)
    return json.loads(json.dumps(zeroshot.results_row(task, metrics)))


def assert_reference_line(ours: dict, reference: dict):
    """Our line is the reference's, key for key in its order and value for value (NaN where it has NaN), plus
    "group"."""
    assert [k for k in ours if k != "group"] == list(reference) and ours["group"]
    assert ours["key"] == reference["key"] and ours["dataset"] == reference["dataset"]
    assert list(ours["metrics"]) == list(reference["metrics"])
    for name, want in reference["metrics"].items():
        got = ours["metrics"][name]
        if want is None or got is None:
            assert got is want is None, name
        elif isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), name
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=0), name


def test_classification_line_has_acc5_null_below_five_classes(tmp_path):
    # Labels 0, 0, 1, 2; shown 0, 1, 1, 2: 3 of 4 right; per class 1/2, 1, 1.
    shown, labels = [0, 1, 1, 2], [0, 0, 1, 2]
    task_dir = write_task(tmp_path / "cifar", [{"png": png(s), "cls": str(c).encode()} for s, c in zip(shown, labels)],
                          classnames=["0", "1", "2", "3"])
    outcomes = {}
    ours = line_of("cifar10", task_dir, outcomes)
    reference = {"key": "cifar10", "dataset": "CIFAR-10", "metrics": {
        "acc1": 3 / 4, "acc5": None, "mean_per_class_recall": (1 / 2 + 1 + 1) / 3, "main_metric": 3 / 4}}
    assert_reference_line(ours, reference)
    assert '"acc5": null' in json.dumps(ours)
    assert noise.metric_on(outcomes["cifar10"], np.arange(4)[None])[0] == ours["metrics"]["main_metric"]


def test_wilds_line_lists_every_group_with_nan_for_empty_ones(tmp_path):
    # FMoW metadata rows: region, year, y. Region 1 has no sample: WILDS lists it as NaN with count 0.0.
    rows = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 1), (0, 0)]
    shown, labels = [0, 1, 2, 0, 4, 5], [0, 1, 2, 3, 4, 5]  # wrong: sample 3 (region 2, year 1)
    samples = [{"webp" if i % 2 else "png": png(s), "cls": str(c).encode(), "npy": npy([r, y, c])}
               for i, ((r, y), s, c) in enumerate(zip(rows, shown, labels))]
    task_dir = write_task(tmp_path / "fmow", samples, classnames=[str(c) for c in range(6)])
    outcomes = {}
    ours = line_of("wilds/fmow", task_dir, outcomes)
    f32 = lambda hits, n: float(np.float32(hits) / np.float32(n))  # noqa: E731
    reference = {"key": "wilds/fmow", "dataset": "FMoW", "metrics": {
        "acc1": 5 / 6, "acc5": 1.0, "mean_per_class_recall": 5 / 6,
        # FMoWEvaluator.eval: standard_group_eval by year, "acc_wg" popped into "acc_worst_year", then regions
        "acc_avg": f32(5, 6), "acc_year:0": 1.0, "count_year:0": 3.0, "acc_year:1": F32_TWO_THIRDS,
        "count_year:1": 3.0, "acc_worst_year": F32_TWO_THIRDS,
        "acc_region:0": 1.0, "count_region:0": 3.0, "acc_region:1": float("nan"), "count_region:1": 0.0,
        "acc_region:2": F32_TWO_THIRDS, "count_region:2": 3.0, "acc_worst_region": F32_TWO_THIRDS,
        "main_metric": F32_TWO_THIRDS}}
    assert_reference_line(ours, reference)
    assert '"acc_region:1": NaN' in json.dumps(ours)
    assert noise.metric_on(outcomes["wilds/fmow"], np.arange(6)[None])[0] == pytest.approx(2 / 3)


def test_iwildcam_line_has_float32_macro_scores(tmp_path):
    shown, labels = [0, 1, 1, 1, 3], [0, 0, 1, 1, 2]
    samples = [{"png": png(s), "cls": str(c).encode(), "npy": npy([0] * 8 + [c])} for s, c in zip(shown, labels)]
    task_dir = write_task(tmp_path / "iwildcam", samples, classnames=[str(c) for c in range(5)])
    outcomes = {}
    ours = line_of("wilds/iwildcam", task_dir, outcomes)
    f1 = float(np.float32((2 / 3 + 4 / 5 + 0) / 3))  # torch.tensor(sklearn's float64): a float32
    reference = {"key": "wilds/iwildcam", "dataset": "iWildCam", "metrics": {
        "acc1": 3 / 5, "acc5": 1.0, "mean_per_class_recall": (1 / 2 + 1 + 0) / 3,
        "acc_avg": float(np.float32(3) / np.float32(5)), "recall-macro_all": float(np.float32((1 / 2 + 1 + 0) / 3)),
        "F1-macro_all": f1, "main_metric": f1}}
    assert_reference_line(ours, reference)
    assert noise.metric_on(outcomes["wilds/iwildcam"], np.arange(5)[None])[0] == pytest.approx(f1, rel=1e-6)


def test_retrieval_line_key_order(tmp_path):
    # 12 images, one caption each (webdataset layout): image i shows i % 8 and its caption names it, so images
    # 8..11 tie with images 0..3 (the line's keys and formulas are what is checked here, not the ties).
    samples = [{"jpg": png(i % 8), "txt": f"{i % 8} thing".encode()} for i in range(12)]
    task_dir = write_task(tmp_path / "flickr", samples)
    outcomes = {}
    ours = line_of("retrieval/flickr_1k_test_image_text_retrieval", task_dir, outcomes)
    names = [f"{way}_retrieval_recall@{k}" for k in (1, 5, 10) for way in ("image", "text")]
    assert list(ours["metrics"]) == names + ["mean_recall@1", "main_metric"]
    m = ours["metrics"]
    assert m["mean_recall@1"] == 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
    # float32 means, as clip_benchmark's .float().mean().item()
    assert m["image_retrieval_recall@1"] == float(np.float32(m["image_retrieval_recall@1"]))
    outcome = outcomes["retrieval/flickr_1k_test_image_text_retrieval"]
    assert noise.metric_on(outcome, np.arange(12)[None])[0] == pytest.approx(m["main_metric"], rel=1e-6)


def test_winogavil_line_has_nan_for_empty_buckets():
    scores = [np.array([5., 4, 3, 2, 1]), np.arange(10.)]
    truths = [np.array([1, 1, 0, 0, 0], bool), np.isin(np.arange(10), [0, 9])]  # jaccard 1, then 1/3
    metrics = winogavil_metrics(scores, truths)
    metrics["main_metric"] = metrics["jaccard_score_10-12"]
    ours = json.loads(json.dumps(zeroshot.results_row(REFERENCE_TASKS["misc/winogavil"], metrics)))
    nan = float("nan")
    reference = {"key": "misc/winogavil", "dataset": "WinoGAViL", "metrics": {
        "avg_jaccard_score": 2 / 3, "jaccard_score_5": 1.0, "jaccard_score_6": nan, "jaccard_score_10": 1 / 3,
        "jaccard_score_12": nan, "jaccard_score_5-6": 1.0, "jaccard_score_10-12": 1 / 3, "main_metric": 1 / 3}}
    assert_reference_line(ours, reference)
    assert '"jaccard_score_6": NaN' in json.dumps(metrics)
    outcome = winogavil_outcome("jaccard_score_10-12", scores, truths)
    assert noise.metric_on(outcome, np.arange(2)[None])[0] == pytest.approx(1 / 3)


def test_tar_member_keys_split_as_webdataset_splits_them(tmp_path):
    from webdataset.tariterators import base_plus_ext

    names = ["a/b.c/x.JPG", "x.tar.gz", "dir.v1/sample.Seg.PNG", "noext", "__key__", "a/__meta__.json",
             "plain.cls", "deep/er/k.jpg"]
    for name in names:
        key, ext = base_plus_ext(name)
        if key is not None and not name.startswith("__") and "/__" not in name:
            assert sample_key_and_extension(name) == (key, ext.lower()), name
    assert sample_key_and_extension("__key__") == (None, None)
    tar_path = tmp_path / "0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ["d.v2/s1.JPG", "d.v2/s1.cls", "d.v2/s2.Jpg", "d.v2/s2.cls", "README"]:
            info = tarfile.TarInfo(name)
            data = name.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = [(key, sorted(files)) for key, files in iter_webdataset(tar_path)]
    assert ours == [("d.v2/s1", ["cls", "jpg"]), ("d.v2/s2", ["cls", "jpg"])]
    import webdataset as wds

    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in wds.WebDataset(str(tar_path),
                                                                                                      shardshuffle=False)]
    assert ours == theirs


def test_hub_images_reach_the_transform_in_their_own_mode(tmp_path):
    """The `datasets` library hands PIL images as decoded; open_clip's transform converts to RGB after resizing."""
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    image = zeroshot.hub_image(buf.getvalue())
    assert image.mode == "RGBA"  # not converted before the transform
    assert zeroshot.decode_image(buf.getvalue()).mode == "RGB"  # a webdataset image is, as webdataset's "pil"
    assert zeroshot.hub_image(rgba) is rgba


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_only_on_cuda():
    assert isinstance(zeroshot.reference_autocast("cpu"), type(zeroshot.contextlib.nullcontext()))
    assert isinstance(zeroshot.reference_autocast("cuda:0"), torch.autocast)
