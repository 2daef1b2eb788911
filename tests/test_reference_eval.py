"""DataComp's 38 reference tasks: the task table, the metrics beyond accuracy, the on-disk layouts, the CLI.

No network: the test sets are miniature stand-ins written in the layouts of the real Hugging Face repos.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
from datacomp_assets.core.shards import write_webdataset
from datacomp_assets.evaluation import cli, reference
from datacomp_assets.evaluation.reference import MissingEvalData, ensure_reference_suite, missing_tasks
from datacomp_assets.evaluation.reference_metrics import (
    camelyon17_metrics, chosen_candidates, dollar_street_metrics, fmow_metrics, geode_metrics, group_eval,
    iwildcam_metrics, jaccard, metadata_metrics, winogavil_metrics,
)
from datacomp_assets.evaluation.zeroshot import evaluate_checkpoint, retrieval_metrics, winogavil_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the task table


def test_reference_table_matches_datacomp():
    tasks = REFERENCE_TASKS
    assert len(tasks) == 38
    groups = Counter(t.group for t in tasks.values())
    assert groups == {"ImageNet": 1, "ImageNet distribution shifts": 6, "VTAB": 13, "Retrieval": 3, "other": 10,
                      "WILDS": 3, "fairness": 2}
    # Repos and folders as DataComp's wds_eval.py / download_evalsets.py derive them.
    assert tasks["vtab/cifar100"].hf_repo == "djghosh/wds_vtab-cifar100_test"
    assert tasks["vtab/cifar100"].dir_name == "wds_vtab-cifar100_test"
    assert tasks["fairness/geode"].hf_repo == "djghosh/wds_geode_test"
    assert tasks["wilds/fmow"].hf_repo == "djghosh/wds_wilds-fmow_test"
    assert tasks["retrieval/flickr_1k_test_image_text_retrieval"].hf_repo == \
        "nlphuji/flickr_1k_test_image_text_retrieval"
    assert tasks["misc/winogavil"].hf_repo == "nlphuji/winogavil"
    main = {k: t.main_metric for k, t in tasks.items() if t.main_metric != "acc1"}
    assert main == {
        "vtab/caltech101": "mean_per_class_recall", "fgvc_aircraft": "mean_per_class_recall",
        "vtab/flowers": "mean_per_class_recall", "vtab/pets": "mean_per_class_recall",
        "retrieval/flickr_1k_test_image_text_retrieval": "mean_recall@1",
        "retrieval/mscoco_2014_5k_test_image_text_retrieval": "mean_recall@1",
        "misc/winogavil": "jaccard_score_10-12", "wilds/iwildcam": "F1-macro_all",
        "wilds/fmow": "acc_worst_region", "fairness/dollar_street": "acc_top5_wg", "fairness/geode": "acc_wg",
    }
    assert tasks["sun397"].group == "VTAB" and tasks["imagenet1k"].name == "ImageNet 1k"


# ---------------------------------------------------------------- metrics on hand-made predictions


def test_group_eval_known_answers():
    m = group_eval([1, 0, 1, 1], [2, 2, 0, 0], "acc", "region")
    # WILDS lists every group up to the largest, an empty one as NaN with count 0 (json writes NaN).
    assert json.dumps(m) == ('{"acc_avg": 0.75, "acc_region:0": 1.0, "count_region:0": 2.0, "acc_region:1": NaN, '
                             '"count_region:1": 0.0, "acc_region:2": 0.5, "count_region:2": 2.0, "acc_wg": 0.5}')


def test_iwildcam_macro_f1_over_present_classes():
    labels, pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 3]
    m = iwildcam_metrics(pred, labels)
    # Class 0: P 1, R 1/2, F1 2/3. Class 1: P 2/3, R 1, F1 4/5. Class 2: never right, F1 0.
    # The predicted class 3 is absent from the labels: it costs class 2 its recall but is not averaged.
    assert m["F1-macro_all"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert m["recall-macro_all"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["acc_avg"] == pytest.approx(3 / 5)


def test_camelyon17_groups_by_slide():
    metadata = np.array([[0, 3, 1], [0, 3, 0], [1, 7, 1]])  # hospital, slide, y
    m = camelyon17_metrics([1, 1, 1], [1, 0, 1], metadata)
    assert m["acc_slide:3"] == 0.5 and m["acc_slide:7"] == 1.0 and m["acc_wg"] == 0.5
    assert np.isnan(m["acc_slide:0"]) and m["count_slide:0"] == 0.0  # hospital is not the slide


def test_fmow_worst_region_counts_every_region():
    metadata = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0], [5, 0, 0], [5, 1, 0]])  # region, year, y
    correct = np.array([1, 1, 1, 0, 0, 0])
    m = fmow_metrics(correct, np.ones(6), metadata)  # pred == label exactly where correct
    assert m["acc_avg"] == pytest.approx(0.5)
    assert m["acc_year:0"] == pytest.approx(2 / 3) and m["acc_year:1"] == pytest.approx(1 / 3)
    assert m["acc_worst_year"] == pytest.approx(1 / 3) and "acc_wg" not in m
    assert m["acc_region:0"] == 1.0 and m["acc_region:1"] == 0.5 and m["count_region:5"] == 2.0
    # Region 5 is WILDS's "Other"; DataComp's evaluator does not leave it out, so neither do we.
    assert m["acc_worst_region"] == 0.0


def test_dollar_street_top5_worst_income_group():
    top5 = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    labels = np.array([4, 5, 5, 0])
    metadata = np.array([[0, 10, 2], [0, 20, 2], [1, 30, 2], [1, 40, 2]])  # income_ds, income_meta, region
    m = dollar_street_metrics(top5, labels, metadata)
    assert m["acc_top5_income_ds:0"] == 0.5 and m["acc_top5_income_ds:1"] == 0.5
    assert m["acc_top5_wg"] == 0.5 and m["acc_top5_avg"] == 0.5
    # From logits: class 4 is second best for sample 0, class 5 is not among sample 1's five best.
    logits = np.array([[9., 1, 2, 3, 8, 0], [9., 8, 7, 6, 5, 0]])
    m = metadata_metrics("fairness/dollar_street", logits, np.array([4, 5]), metadata[:2])
    assert m["acc_top5_avg"] == 0.5


def test_geode_worst_region():
    m = geode_metrics([0, 1, 2, 3], [0, 1, 0, 0], np.array([[0, 9], [0, 8], [2, 9], [2, 9]]))  # region, country
    assert m["acc_region:0"] == 1.0 and m["acc_region:2"] == 0.0 and m["acc_wg"] == 0.0
    assert m["acc_avg"] == 0.5 and metadata_metrics("imagenet1k", np.eye(2), [0, 1], np.zeros((2, 0))) == {}


def test_winogavil_jaccard():
    assert jaccard([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(1 / 3)
    assert jaccard([0, 0], [0, 0]) == 0.0
    assert list(chosen_candidates(np.array([0.1, 0.9, 0.5, 0.7]), 2)) == [False, True, False, True]
    scores = [np.array([5., 4, 3, 2, 1]), np.arange(10.), np.arange(12.)]
    truths = [np.array([1, 1, 0, 0, 0], bool),            # picks the two best: right, 1
              np.isin(np.arange(10), [0, 9]),             # picks 8 and 9: 1 of 3
              np.isin(np.arange(12), [0, 1, 2])]          # picks 9, 10, 11: 0
    m = winogavil_metrics(scores, truths)
    assert m["jaccard_score_5"] == 1.0 and m["jaccard_score_5-6"] == 1.0
    assert m["jaccard_score_10"] == pytest.approx(1 / 3) and m["jaccard_score_12"] == 0.0
    assert m["jaccard_score_10-12"] == pytest.approx(1 / 6)
    assert m["avg_jaccard_score"] == pytest.approx(4 / 9) and np.isnan(m["jaccard_score_6"])  # as the reference
    assert winogavil_prompt("Owl") == "An owl" and winogavil_prompt("moon") == "A moon"


def test_retrieval_recall_at_k():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2. scores[text, image].
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.7, 0.0], [0.5, 0.0, 0.4]])
    m = retrieval_metrics(scores, torch.tensor([0, 0, 1, 2]), recall_at=(1, 2, 4))
    assert m["image_retrieval_recall@2"] == 1.0  # every caption's image is in its two best
    assert m["text_retrieval_recall@2"] == 1.0 and m["text_retrieval_recall@4"] == 1.0
    assert "image_retrieval_recall@4" not in m  # only 3 images to rank


# ---------------------------------------------------------------- stand-ins in the real repos' layouts

N_FEATURES = 16


def colour_image(shown_class: int, size: int = 16) -> Image.Image:
    """An image the colour-coded model reads as showing `shown_class` (red = 16 * class)."""
    return Image.new("RGB", (size, size), (16 * shown_class, 90, 40))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def npy(row) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(row, dtype=np.int64))
    return buffer.getvalue()


def write_wds_task(root: Path, task_key: str, classnames: list[str], shown: list[int], labels: list[int],
                   metadata: list | None = None, shards: int = 2) -> None:
    """A classification task as djghosh/wds_*_test holds it: webp + cls (+ npy) samples in test/{i}.tar."""
    task_dir = root / REFERENCE_TASKS[task_key].dir_name
    (task_dir / "test").mkdir(parents=True)
    (task_dir / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (task_dir / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    samples = []
    for i, (c, label) in enumerate(zip(shown, labels)):
        files = {"webp": encode(colour_image(c), "WEBP"), "cls": str(label).encode()}
        if metadata is not None:
            files["npy"] = npy(metadata[i])
        samples.append((f"s{i:07d}", files))
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        write_webdataset(task_dir / "test" / f"{shard}.tar", samples[shard * per_shard:(shard + 1) * per_shard])
    (task_dir / "test" / "nshards.txt").write_text(f"{shards}\n")


def write_flickr(root: Path, shown: list[int], captions: list[list[str]]) -> None:
    """The repo's own files: test_1k_flickr.csv (filename, raw = JSON captions) and the images' zip."""
    task_dir = root / REFERENCE_TASKS["retrieval/flickr_1k_test_image_text_retrieval"].dir_name
    task_dir.mkdir(parents=True)
    with zipfile.ZipFile(task_dir / "images_flickr_1k_test.zip", "w") as archive:
        for i, c in enumerate(shown):
            archive.writestr(f"images_flickr_1k_test/{1000 + i}.jpg", encode(colour_image(c, 64), "JPEG"))
    with (task_dir / "test_1k_flickr.csv").open("w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for i, caps in enumerate(captions):
            writer.writerow([json.dumps(caps), json.dumps(list(range(len(caps)))), "test", f"{1000 + i}.jpg", i])


def write_winogavil(root: Path, instances: list[tuple[str, list[int], list[int]]]) -> None:
    """Parquet rows as `datasets` gives them: cue, candidates, associations, candidate_images (structs)."""
    task_dir = root / REFERENCE_TASKS["misc/winogavil"].dir_name / "default" / "test"
    task_dir.mkdir(parents=True)
    rows = {"cue": [], "candidates": [], "associations": [], "candidate_images": []}
    for cue, shown, associated in instances:
        names = [f"w{j}" for j in range(len(shown))]
        rows["cue"].append(cue)
        rows["candidates"].append(names)
        rows["associations"].append([names[j] for j in associated])
        rows["candidate_images"].append([{"bytes": encode(colour_image(c), "PNG"), "path": None} for c in shown])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("cue", pa.string()), ("candidates", pa.list_(pa.string())),
                        ("associations", pa.list_(pa.string())), ("candidate_images", pa.list_(image))])
    pq.write_table(pa.table(rows, schema=schema), task_dir / "0000.parquet")


# What the model "sees" (shown class per image) next to the truth, chosen so every metric is known by hand.
CIFAR_SHOWN = [0, 1, 1, 1, 2, 2, 3, 0, 4, 4, 5, 0]
CIFAR_LABELS = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
FMOW_LABELS = [1, 2, 3, 4, 1, 2, 3, 4]
FMOW_RIGHT = [1, 1, 1, 0, 1, 1, 1, 0]
FMOW_METADATA = [[0, 0, 1], [0, 1, 2], [1, 0, 3], [1, 1, 4], [5, 0, 1], [5, 1, 2], [5, 0, 3], [5, 1, 4]]
STREET_SHOWN, STREET_LABELS = [0, 0, 3, 3, 0, 2], [0, 3, 0, 7, 5, 2]
STREET_METADATA = [[0, 1, 4], [0, 0, 4], [1, 1, 4], [1, 0, 4], [2, 1, 4], [2, 0, 4]]  # income_ds, income_meta
TASKS = ["cifar10", "wilds/fmow", "fairness/dollar_street", "retrieval/flickr_1k_test_image_text_retrieval",
         "misc/winogavil"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference_data")
    write_wds_task(root, "cifar10", [f"class {k}" for k in range(6)], CIFAR_SHOWN, CIFAR_LABELS)
    write_wds_task(root, "wilds/fmow", [f"class {k}" for k in range(6)],
                   [y if right else (y + 1) % 6 for y, right in zip(FMOW_LABELS, FMOW_RIGHT)], FMOW_LABELS,
                   metadata=FMOW_METADATA, shards=1)
    write_wds_task(root, "fairness/dollar_street", [f"class {k}" for k in range(8)], STREET_SHOWN, STREET_LABELS,
                   metadata=STREET_METADATA)
    write_flickr(root, [1, 2, 3], [["thing 1 here", "thing 1 again"], ["thing 4"], ["thing 3"]])
    write_winogavil(root, [("2", [2, 3, 9, 10, 11], [0, 2]), ("0", list(range(10)), [0, 1, 5])])
    return root


class ColourCodedModel(torch.nn.Module):
    """A stand-in CLIP whose answers are known: an image shows class round(red / 16); a text names the class
    written in it. Image features rank class c first, then c+1, c+2, ... (mod 16), so top-5 is c..c+4."""

    def encode_image(self, images):
        shown = (images[:, 0].mean(dim=(1, 2)) * 255 / 16).round().long() % N_FEATURES
        offset = (torch.arange(N_FEATURES)[None, :] - shown[:, None]) % N_FEATURES
        return (N_FEATURES - offset).float()

    def encode_text(self, tokens):
        return F.one_hot(tokens, N_FEATURES).float()


def colour_coded_model(*args, **kwargs):
    def preprocess(image):
        return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1)

    def tokenizer(texts):
        return torch.tensor([int(re.search(r"\d+", t).group()) % N_FEATURES for t in texts])

    return ColourCodedModel(), preprocess, tokenizer


def run_cli(data_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["--model", "datacomp-tiny", "--suite", "reference", "--data-dir", str(data_dir),
                     "--out", str(out), "--device", "cpu", "--batch-size", "5", "--tasks", *TASKS, *extra])


def test_standins_score_what_hand_computation_says(standins, tmp_path, monkeypatch, capsys):
    """Every metric of every layout, end to end through the CLI, with a model whose answers are known."""
    monkeypatch.setattr("datacomp_assets.core.models.load_model", colour_coded_model)
    out = tmp_path / "eval_results.jsonl"
    assert run_cli(standins, out) == 0
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == TASKS

    cifar = rows["cifar10"]["metrics"]
    assert cifar["acc1"] == pytest.approx(9 / 12) and cifar["main_metric"] == cifar["acc1"]
    # Per class: 1/2, 1, 1, 1/2, 1, 1/2. Top-5 misses: label 0 shown 1, label 5 shown 0.
    assert cifar["mean_per_class_recall"] == pytest.approx(4.5 / 6) and cifar["acc5"] == pytest.approx(10 / 12)

    fmow = rows["wilds/fmow"]["metrics"]
    # Regions 0: 2/2, 1: 1/2, 5: 3/4; years 0: 4/4, 1: 2/4.
    assert fmow["acc_region:1"] == 0.5 and fmow["acc_region:5"] == 0.75 and fmow["count_region:5"] == 4.0
    assert fmow["main_metric"] == fmow["acc_worst_region"] == 0.5
    assert fmow["acc_worst_year"] == 0.5 and fmow["acc_year:0"] == 1.0 and fmow["acc1"] == pytest.approx(6 / 8)

    street = rows["fairness/dollar_street"]["metrics"]
    # Income 0: both in the top 5; 1: label 0 is not among 3..7; 2: label 5 is not among 0..4.
    assert street["acc_top5_income_ds:0"] == 1.0 and street["acc_top5_income_ds:2"] == 0.5
    assert street["main_metric"] == street["acc_top5_wg"] == 0.5 and street["acc1"] == pytest.approx(2 / 6)

    flickr = rows["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]
    # "thing 4" goes to the image of 3; the image of 2 ranks "thing 3" first.
    assert flickr["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert flickr["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert flickr["main_metric"] == pytest.approx((3 / 4 + 2 / 3) / 2)

    wino = rows["misc/winogavil"]["metrics"]
    # Cue 2 over shown 2,3,9,10,11 picks 2 and 11 (truth 2, 9): 1/3. Cue 0 picks 0, 9, 8 (truth 0, 1, 5): 1/5.
    assert wino["jaccard_score_5"] == pytest.approx(1 / 3) and wino["main_metric"] == pytest.approx(1 / 5)
    assert wino["avg_jaccard_score"] == pytest.approx((1 / 3 + 1 / 5) / 2)

    assert {r["dataset"] for r in rows.values()} == {"CIFAR-10", "FMoW", "Dollar Street", "Flickr", "WinoGAViL"}
    printed = capsys.readouterr().out
    assert f"Retrieval: {(flickr['main_metric'] + wino['main_metric']) / 2:.4f}" in printed
    assert "Average over 5 of 38 tasks" in printed


def test_cli_evaluates_a_checkpoint_saved_outside_the_pipeline(standins, tmp_path, monkeypatch, capsys):
    import open_clip

    from datacomp_assets.core.models import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    checkpoint = tmp_path / "outside.pt"
    torch.save(open_clip.create_model("datacomp-tiny").state_dict(), checkpoint)
    out = tmp_path / "eval_results.jsonl"
    assert run_cli(standins, out, "--checkpoint", str(checkpoint)) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in lines] == TASKS
    for row in lines:
        task = REFERENCE_TASKS[row["key"]]
        assert set(row) == {"key", "dataset", "group", "metrics"}
        assert row["dataset"] == task.name and row["group"] == task.group
        assert row["metrics"]["main_metric"] == row["metrics"][task.main_metric]
        assert 0.0 <= row["metrics"]["main_metric"] <= 1.0
    assert "count_income_ds:1" in lines[2]["metrics"] and "text_retrieval_recall@1" in lines[3]["metrics"]

    # A rerun loads no model and writes nothing; a lost line is the only task redone.
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the model although every task is done")

    before = out.read_text()
    monkeypatch.setattr("datacomp_assets.core.models.load_model", must_not_run)
    assert run_cli(standins, out, "--checkpoint", str(checkpoint)) == 0
    assert out.read_text() == before
    monkeypatch.undo()
    out.write_text("".join(line + "\n" for line in before.splitlines()[:-1]))
    capsys.readouterr()
    assert run_cli(standins, out, "--checkpoint", str(checkpoint)) == 0
    assert "evaluating misc/winogavil" in capsys.readouterr().out
    after = [json.loads(line) for line in out.read_text().splitlines()]
    assert after[:-1] == lines[:-1] and after[-1]["key"] == "misc/winogavil"
    assert after[-1]["metrics"] == pytest.approx(lines[-1]["metrics"], nan_ok=True)  # same checkpoint, same scores


# ---------------------------------------------------------------- missing test sets


def test_offline_without_data_fails_at_once_naming_every_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the model before checking the data")

    monkeypatch.setattr("datacomp_assets.core.models.load_model", must_not_run)
    out = tmp_path / "eval_results.jsonl"
    argv = ["--model", "ViT-B-32", "--data-dir", str(tmp_path / "none"), "--out", str(out), "--download"]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in message and "--download" in message
    for task in REFERENCE_TASKS.values():
        assert f"{task.key}: Hugging Face dataset {task.hf_repo}" in message
    assert not out.exists()
    # Without --download it fails the same way, whatever the network.
    assert cli.main(argv[:-1]) == 2 and "downloading is off" in capsys.readouterr().err
    # Called directly, the evaluation checks every task left to do before it loads the model.
    with pytest.raises(MissingEvalData) as error:
        evaluate_checkpoint("ViT-B-32", None, tmp_path / "none", out, registry=REFERENCE_TASKS,
                            tasks=["imagenet1k", "misc/winogavil"])
    assert [t.key for t in error.value.missing] == ["imagenet1k", "misc/winogavil"]
    assert "nlphuji/winogavil" in str(error.value)


def test_module_entry_point_reports_missing_tasks(tmp_path, standins):
    """`python -m datacomp_assets.evaluation`: the present tasks pass, the absent one is named, exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "datacomp_assets.evaluation", "--model", "datacomp-tiny", "--data-dir", str(standins),
         "--out", str(tmp_path / "r.jsonl"), "--tasks", "cifar10", "imagenet1k", "--download"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "imagenet1k: Hugging Face dataset djghosh/wds_imagenet1k_test" in result.stderr
    assert "cifar10" not in result.stderr.split("):", 1)[1]
    assert not (tmp_path / "r.jsonl").exists()


def test_download_fetches_only_the_missing_tasks(standins, tmp_path, monkeypatch):
    """With the Hub on, missing sets are fetched into their folders (a fake Hub writes the repo's files)."""
    import huggingface_hub

    root = tmp_path / "data"
    fetched = []

    def fake_snapshot_download(repo_id, repo_type, local_dir, **kwargs):
        assert repo_type == "dataset"
        fetched.append(repo_id)
        source = standins / repo_id.split("/", 1)[1]
        for path in source.rglob("*"):
            if path.is_file():
                (Path(local_dir) / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / path.relative_to(source)).write_bytes(path.read_bytes())
        return str(local_dir)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    write_wds_task(root, "cifar10", ["class 0"], [0], [0], shards=1)  # already there: not fetched again
    keys = ["cifar10", "wilds/fmow", "retrieval/flickr_1k_test_image_text_retrieval"]
    fetched_tasks = ensure_reference_suite(root, download=True, tasks=keys)
    assert [t.key for t in fetched_tasks] == keys[1:]
    assert fetched == ["djghosh/wds_wilds-fmow_test", "nlphuji/flickr_1k_test_image_text_retrieval"]
    assert missing_tasks(root, [REFERENCE_TASKS[k] for k in keys]) == []
    assert ensure_reference_suite(root, download=False, tasks=keys) == []  # nothing left to fetch


def test_incomplete_webdataset_counts_as_missing(standins, tmp_path):
    task_dir = tmp_path / REFERENCE_TASKS["cifar10"].dir_name
    (task_dir / "test").mkdir(parents=True)
    (task_dir / "test" / "nshards.txt").write_text("2\n")
    (task_dir / "test" / "0.tar").write_bytes((standins / task_dir.name / "test" / "0.tar").read_bytes())
    assert missing_tasks(tmp_path, [REFERENCE_TASKS["cifar10"]]) == [REFERENCE_TASKS["cifar10"]]
    (task_dir / "test" / "1.tar").write_bytes((standins / task_dir.name / "test" / "1.tar").read_bytes())
    assert missing_tasks(tmp_path, [REFERENCE_TASKS["cifar10"]]) == []
    assert reference.is_present(task_dir)
