"""SIEVE: generic phrases masked as the reference masks them, the score as the best cosine over an image's generated
captions (against a plain loop with a toy sentence encoder), seeded caption sampling from the tiny CoCa (random
weights: nothing is trained here), shard-by-shard scoring that resumes, and the captioner as a user's file at a
paper scale. And the cosine scorers (DFN, T-MARS, flipped), which share SIEVE's shard writer."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datacomp_assets.core.models import Scorer, load_model
from datacomp_assets.core.scorers import CAPTIONER_MODEL
from datacomp_assets.core.shards import read_downloaded, write_webdataset
from datacomp_assets.filtering.image_scores import score_shards, write_shard_scores
from datacomp_assets.filtering.sieve import SieveScoring, generated_captions, mask_generic_phrases, sieve_scores


def test_generic_phrases_are_masked_like_the_reference():
    assert mask_generic_phrases([
        "A Photo of a red circle, stock photo",
        "an image of two blue stars",
        "Photo stock: IMAGE of a tee",
        "imagery of photographs",
        "three green triangles, vector",
        "Stock Photo",
    ]) == [
        "a red circle,",          # "a photo of" first, then "stock photo"
        "two blue stars",
        ": of a tee",             # "photo stock", then "image" alone
        "ry of graphs",           # inside words too, as the reference's re.sub
        "three green triangles, vector",
        "",
    ]


def _toy_encoder(texts):
    """Bag of words hashed into 16 dimensions, plus a constant (so that the empty text has a direction)."""
    out = np.zeros((len(texts), 17))
    for row, text in zip(out, texts):
        row[16] = 0.5
        for word in text.lower().split():
            row[sum(map(ord, word)) % 16] += 1.0
    return out  # not normalised: sieve_scores must do it


def test_score_is_the_best_cosine_over_the_masked_captions():
    alts = ["a photo of a red circle", "two blue stars, stock photo", "Here is a pink crescent", "an image of"]
    generated = [["a red circle", "a blue square", "an image of a red ring"],
                 ["blue stars", "two blue stars on a plain background", "a photo"],
                 ["a green tee", "a photo of a yellow bar", "an orange heart"],
                 ["a photo", "a red circle", "two green crosses"]]
    scores, best = sieve_scores(alts, generated, _toy_encoder)

    def cosine(a, b):
        u, v = _toy_encoder([a])[0], _toy_encoder([b])[0]
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    masked_alts = ["a red circle", "two blue stars,", "Here is a pink crescent", ""]
    masked_gen = [["a red circle", "a blue square", "a red ring"],
                  ["blue stars", "two blue stars on a plain background", ""],
                  ["a green tee", "a yellow bar", "an orange heart"],
                  ["", "a red circle", "two green crosses"]]
    for i in range(len(alts)):
        sims = [cosine(masked_alts[i], caption) for caption in masked_gen[i]]
        j = int(np.argmax(sims))
        assert best[i] == generated[i][j]
        # The reference scores 0 when the best caption masks to nothing (here the empty alt-text's best match).
        expected = 0.0 if masked_gen[i][j] == "" else sims[j]
        assert scores[i] == pytest.approx(expected, abs=1e-6)
    assert best[0] == "a red circle" and scores[0] == pytest.approx(1.0)
    assert best[3] == "a photo" and scores[3] == 0.0
    assert scores.dtype == np.float32
    with pytest.raises(ValueError, match="same number"):
        sieve_scores(["a", "b"], [["x", "y"], ["z"]], _toy_encoder)
    empty_scores, empty_best = sieve_scores([], [], _toy_encoder)
    assert len(empty_scores) == 0 and empty_best == []


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return load_model(CAPTIONER_MODEL)  # (model, preprocess, tokenizer), random weights


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiny_captioner_is_a_coca_that_open_clips_trainer_trains_with_its_coca_loss(captioner, tmp_path):
    from open_clip.loss import CoCaLoss
    from open_clip_train.params import parse_args

    from datacomp_assets.core.models import CAPTIONER_VOCABULARY, forward_check
    from datacomp_assets.core.scales import SCALES
    from datacomp_assets.core.scorers import captioner_recipe
    from datacomp_assets.core.trainer import TrainJob

    model, _, tokenizer = captioner
    assert type(model).__name__ == "CoCa"
    # its own vocabulary, every word of the curated source's captions one token
    assert tokenizer.vocab_size == model.text.vocab_size == model.text_decoder.text_projection.shape[1] == 862
    assert CAPTIONER_VOCABULARY.is_file()
    for caption in ["a photo of four blue lightning bolts on a plain background", "Here is a pink crescent"]:
        ids = tokenizer([caption])[0]
        assert int((ids != 0).sum()) == len(caption.split()) + 2  # sot, one token a word, eot
    # open_clip's trainer, given the project's flags for the captioner, builds its CoCa loss ...
    args = parse_args(TrainJob(captioner_recipe(SCALES["tiny"]), "x.tar", tmp_path, "captioner").argv())
    args.rank, args.world_size, args.distill = 0, 1, False
    from open_clip import create_loss
    loss_fn = create_loss(args)
    assert isinstance(loss_fn, CoCaLoss)
    # ... which trains this model: a forward and backward pass gives finite gradients
    text = tokenizer(["a red circle", "two blue stars, stock image"])
    losses = loss_fn(**model(torch.randn(2, 3, 32, 32), text), output_dict=True)
    assert set(losses) == {"contrastive_loss", "caption_loss"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    # a saved checkpoint passes the check a user's captioner gets at a paper scale
    torch.save({"state_dict": model.state_dict()}, tmp_path / "captioner.pt")
    assert forward_check(CAPTIONER_MODEL, tmp_path / "captioner.pt") is None


def test_generation_is_seeded_and_gives_n_captions_per_image(captioner):
    model, preprocess, tokenizer = captioner
    images, threads = _images(5), torch.get_num_threads()
    first = generated_captions(model, tokenizer, preprocess, images, n_captions=3, seed=7, batch_size=2)
    again = generated_captions(model, tokenizer, preprocess, images, n_captions=3, seed=7, batch_size=2)
    other = generated_captions(model, tokenizer, preprocess, images, n_captions=3, seed=8, batch_size=2)
    assert first == again and first != other
    assert torch.get_num_threads() == threads  # one thread while sampling on the CPU, then as it was
    assert len(first) == 5 and all(len(caps) == 3 for caps in first)
    assert all(isinstance(c, str) and c and c == c.strip() for caps in first for c in caps)
    # at most context length - 1 new tokens, never the special tokens as text
    assert all(len(tokenizer([c])[0].nonzero()) <= tokenizer.context_length for caps in first for c in caps)
    assert not any("_of_text>" in c for caps in first for c in caps)


def _write_shard(path, uids, texts, seed):
    def samples():
        for i, (uid, text, image) in enumerate(zip(uids, texts, _images(len(uids), seed))):
            jpg = io.BytesIO()
            image.save(jpg, "JPEG")
            yield f"{i:09d}", {"jpg": jpg.getvalue(), "txt": text.encode(), "json": json.dumps({"uid": uid}).encode()}
    write_webdataset(path, samples())


def test_caption_shards_are_written_atomically_and_resume(captioner, tmp_path):
    model, preprocess, tokenizer = captioner
    shards, out = tmp_path / "shards", tmp_path / "sieve"
    shards.mkdir()
    _write_shard(shards / "00000000.tar", [f"{i:032x}" for i in range(3)], ["a red circle", "a photo", "x"], 0)
    _write_shard(shards / "00000001.tar", [f"{i:032x}" for i in range(3, 5)], ["two blue stars", "tee"], 1)
    calls = []

    def scoring(shard, records, images):
        calls.append(shard)
        return SieveScoring(model, tokenizer, preprocess, _toy_encoder, seed=3, n_captions=2)(shard, records, images)

    summary = write_shard_scores(shards, out, "sieve_score", scoring, log=lambda _: None)
    assert calls == ["00000000", "00000001"] and summary["images_scored"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["00000000.parquet", "00000001.parquet",  # no temporary left
                                                     "_manifest.json"]  # (their manifest)
    first = pq.read_table(out / "00000001.parquet")
    assert first.column_names == ["uid", "sieve_score", "generated_caption"]
    assert str(first.schema.field("generated_caption").type) == "string"
    assert first.column("uid").to_pylist() == [f"{i:032x}" for i in range(3, 5)]

    (out / "00000001.parquet").unlink()  # as if killed before the second shard was written
    kept = (out / "00000000.parquet").stat().st_mtime_ns
    calls.clear()
    summary = write_shard_scores(shards, out, "sieve_score", scoring, log=lambda _: None)
    assert calls == ["00000001"] and summary["shards_skipped"] == 1 and summary["images_scored"] == 2
    assert (out / "00000000.parquet").stat().st_mtime_ns == kept
    assert pq.read_table(out / "00000001.parquet").equals(first)  # each shard's own seed: the same captions


def test_a_paper_scale_needs_the_users_captioner(tmp_path):
    from datacomp_assets.core.inputs import configured_problems, inputs_for_columns
    from datacomp_assets.core.layout import Layout
    from datacomp_assets.core.scales import SCALES
    from datacomp_assets.filtering.assets import scoring_model
    from datacomp_assets.metadata.assets import users_checkpoint

    small = SCALES["small"]
    assert small.captioner_architecture == "coca_ViT-L-14" and not small.captioner_checkpoint
    with pytest.raises(FileNotFoundError, match="no `captioner_checkpoint` is configured.*coca_ViT-L-14"):
        scoring_model(small, Layout(tmp_path), "captioner")
    with pytest.raises(FileNotFoundError, match="captioner_checkpoint.*mscoco_finetuned_laion2B-s13B-b90k"):
        users_checkpoint(small, "captioner_checkpoint", small.captioner_architecture)
    needed = inputs_for_columns({"sieve_score"})
    assert set(needed) == {"captioner_checkpoint", "clip_l14_checkpoint"}
    assert any("captioner_checkpoint" in problem for problem in configured_problems(small, needed))


def test_cosine_scores_go_through_the_same_shard_writer(tmp_path):
    """score_shards (DFN, T-MARS, flipped) is write_shard_scores with a cosine: one row per image, its cosine."""
    shards, out = tmp_path / "shards", tmp_path / "flipped"
    shards.mkdir()
    _write_shard(shards / "00000000.tar", [f"{i:032x}" for i in range(3)], ["a red circle", "two stars", "x"], 0)
    torch.manual_seed(0)
    scorer = Scorer("l14", *load_model("datacomp-tiny-l14"))

    def flipped(images):
        return [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images], {"n": np.arange(len(images))}
    score_shards(shards, out, scorer, "flipped_score", log=lambda _: None, prepare=flipped)
    table = pq.read_table(out / "00000000.parquet")
    assert table.column_names == ["uid", "flipped_score", "n"]
    records, images = read_downloaded(shards / "00000000.tar")
    image, text = scorer.embed(flipped(images)[0], [r["text"] for r in records])
    np.testing.assert_allclose(table.column("flipped_score").to_numpy(), (image * text).sum(1), rtol=1e-5)
