"""Downstream heads, losses and metrics on tiny configs; retrieval ranking split over ranks."""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixelbert_dist.config import DataConfig, ModelConfig, TaskConfig
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.evaluate import recall_at_k, recall_over_folds, retrieval, vqa_accuracy
from pixelbert_dist.data.types import TaskBatch
from pixelbert_dist.tasks import PixelBertForTask, task_model
from tests.launch import spawn_ranks

TINY = ModelConfig(backbone="custom", backbone_widths=[8, 8, 16, 16], train_backbone_norm=True, hidden_size=32,
                   num_layers=1, num_heads=2, intermediate_size=64, vocab_size=40, dropout=0.0,
                   max_position_embeddings=32, pixel_sample_count=2)


def _model(name: str, **task) -> PixelBertForTask:
    torch.manual_seed(0)
    if name == "vqa":
        task.setdefault("answer_vocab", "answers.json")  # the config requires one; the head takes its size
    model = task_model(TINY, TaskConfig(name=name, **task), num_answers=6)
    model.adopt_pretraining_heads()
    return model.train()


def _batch(images: int, sequences: int, image_index, labels=None) -> TaskBatch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (sequences, 7), generator=generator)
    ids[:, 0] = 2
    return TaskBatch(torch.randint(0, 256, (images, 3, 128, 192), generator=generator, dtype=torch.uint8),
                     torch.ones(images, 128, 192, dtype=torch.bool), ids,
                     torch.ones(sequences, 7, dtype=torch.long), torch.as_tensor(image_index), labels)


def test_vqa_head_is_binary_cross_entropy_over_answers_on_all_visual_tokens():
    model = _model("vqa")
    labels = torch.tensor([[0, 1, 0, 0, 1 / 3, 0], [2 / 3, 0, 0, 0, 0, 0.0]])
    out = model(_batch(2, 2, [0, 1], labels))
    assert out.logits.shape == (2, 6)
    expected = F.binary_cross_entropy_with_logits(out.logits, labels, reduction="sum") / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    top = out.logits.argmax(-1)
    assert torch.isclose(out.accuracy, 100 * labels[torch.arange(2), top].mean())  # in %, as evaluation
    # no pixel sampling in fine-tuning: the same batch gives the same logits twice in train mode
    assert torch.equal(model(_batch(2, 2, [0, 1], labels)).logits, out.logits)


def test_nlvr2_concatenates_the_two_images_cls_vectors():
    model = _model("nlvr2").eval()
    batch = _batch(4, 4, [0, 1, 2, 3], torch.tensor([1, 0]))
    out = model(batch)
    assert out.logits.shape == (2, 2)
    visual, mask = model.visual_tokens(batch.images, batch.pixel_mask)
    pooled = model.pooled(batch.input_ids, batch.attention_mask, visual, mask)
    by_hand = model.head(torch.cat([pooled[0::2], pooled[1::2]], dim=1))
    assert torch.allclose(out.logits, by_hand, atol=1e-5)
    swapped = _batch(4, 4, [1, 0, 3, 2], torch.tensor([1, 0]))  # left and right exchanged
    assert not torch.allclose(model(swapped).logits, out.logits)
    labels = out.logits.argmax(-1)
    labels[0] = 1 - labels[0]  # one of two pairs predicted right
    assert model(_batch(4, 4, [0, 1, 2, 3], labels)).accuracy == 50.0  # in %, as evaluation


def test_retrieval_takes_gradients_from_the_hardest_negatives_and_keeps_the_cnn_frozen():
    model = _model("retrieval", negatives=4, hard_negatives=2, freeze_cnn=True)
    stats = {k: v.clone() for k, v in model.body.visual.cnn.state_dict().items()}
    batch = _batch(3, 15, torch.arange(3).repeat_interleave(5))
    out = model(batch)
    assert out.logits.shape == (3, 3)  # true caption + 2 hard negatives per image
    with torch.no_grad():
        visual, mask = model.visual_tokens(batch.images, batch.pixel_mask)
        scores = model.match_scores(batch.input_ids, batch.attention_mask, visual[batch.image_index],
                                    mask[batch.image_index]).reshape(3, 5)
    hardest = scores[:, 1:].sort(dim=1, descending=True).values[:, :2]
    assert torch.allclose(out.logits[:, 0], scores[:, 0], atol=1e-5)
    assert torch.allclose(out.logits[:, 1:], hardest, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in model.body.visual.cnn.parameters())
    assert model.body.visual.proj.weight.grad is not None
    for key, value in model.body.visual.cnn.state_dict().items():  # batch-norm statistics too
        assert torch.equal(value, stats[key]), key
    # each image's best-scored caption moved first: the true caption ranks first for all, 100%
    best_first = (scores.argsort(dim=1, descending=True) + 5 * torch.arange(3)[:, None]).flatten()
    ranked = dataclasses.replace(batch, input_ids=batch.input_ids[best_first])
    assert model(ranked).accuracy == 100.0


def test_retrieval_head_starts_as_the_itm_heads_match_log_odds():
    torch.manual_seed(0)
    model = task_model(TINY, TaskConfig(name="retrieval"))
    itm = model.body.cls.seq_relationship
    pooled = torch.randn(5, TINY.hidden_size)
    logits = itm(pooled)
    model.adopt_pretraining_heads()
    assert model.body.cls is None
    assert torch.allclose(model.head(pooled).squeeze(-1), logits[:, 1] - logits[:, 0], atol=1e-6)


# ---------------------------------------------------------------------------- metrics by hand

def test_vqa_accuracy_is_the_official_leave_one_out_average():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0                 # normalised: number words
    assert vqa_accuracy("Yes.", ["yes"] * 4 + ["no"] * 6) == 1.0  # punctuation, case
    assert math.isclose(vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7), (3 * 2 / 3 + 7) / 10)
    # 2 "yes" of 10: leaving a "yes" out leaves 1 match (1/3), leaving a "no" out 2 (2/3)
    assert math.isclose(vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8), (2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("maybe", ["yes"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_recall_at_k_on_a_hand_checked_matrix():
    # 3 images, 2 captions each: caption j belongs to image j // 2
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([
        [9.0, 1.0, 8.0, 0.0, 0.0, 0.0],   # image 0: a true caption first        -> text rank 0
        [7.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # image 1: captions 0, 2 first; 2 true -> text rank 1
        [0.0, 0.0, 0.0, 0.0, 0.0, -1.0],  # image 2: ties among 0-4; true 4 and 5 last-ish
    ])
    r = recall_at_k(scores, caption_image, ks=(1, 2))
    assert r["text_r1"] == pytest.approx(100 / 3)
    # caption 0: image 0 (9) first; 1: image 0 (1) first; 2: image 0 (8) first -> miss @1, image 1 second
    # 3: all 0 (ties); 4: all 0 (ties); 5: image 2 (-1) last -> miss @2
    assert r["image_r1"] <= 100 * 4 / 6
    assert r["image_r2"] < 100.0
    perfect = recall_at_k(torch.eye(3).repeat_interleave(2, dim=1), caption_image)
    assert perfect["text_r1"] == perfect["image_r1"] == 100.0


def test_recall_over_folds_ranks_each_fold_against_its_own_captions_only():
    # 4 images, one caption each. Within a fold the true caption scores highest, but every image
    # scores the other fold's captions higher still: the whole ranking misses, each fold hits.
    caption_image = torch.arange(4)
    scores = torch.tensor([[2.0, 1.0, 9.0, 9.0], [1.0, 2.0, 9.0, 9.0], [9.0, 9.0, 2.0, 1.0], [9.0, 9.0, 1.0, 2.0]])
    whole = recall_at_k(scores, caption_image, ks=(1,))
    assert whole["text_r1"] == whole["image_r1"] == 0.0
    folds = recall_over_folds(scores, caption_image, 2)
    assert folds["folds2.text_r1"] == folds["folds2.image_r1"] == 100.0


# ---------------------------------------------------------------------------- ranking over ranks

def _jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 80), color).save(out, format="JPEG")
    return out.getvalue()


def _pairs() -> list[Pair]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    words = ["red", "green", "blue", "yellow", "cyan"]
    return [Pair("s", i, f"img{i // 2}", _jpeg(colors[i // 2]), f"a {words[i // 2]} {'box' if i % 2 else 'square'}")
            for i in range(2 * len(colors))]


def _scores_on(rank: int, world: int, port: int, out: dict) -> None:
    from pixelbert_dist.tokenizer import load_tokenizer

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    model = _model("retrieval").eval()
    tokenizer = load_tokenizer(os.environ["PIXELBERT_TEST_VOCAB"])
    data = DataConfig(image_short_side=64, image_long_side=96, max_text_len=10)
    metrics = retrieval(model.visual_tokens, model.match_scores, _pairs(), tokenizer, data, "cpu",
                        batch_size=3)
    out[rank] = metrics
    if world > 1:
        torch.distributed.destroy_process_group()


def _worker(rank, world, port, queue):
    result = {}
    _scores_on(rank, world, port, result)
    queue.put((rank, result[rank]))


def test_retrieval_ranking_split_over_two_ranks_equals_one_rank(tmp_path, monkeypatch):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "green", "blue",
                                "yellow", "cyan", "box", "square"] + [f"w{i}" for i in range(27)]) + "\n")
    monkeypatch.setenv("PIXELBERT_TEST_VOCAB", str(vocab))
    single: dict = {}
    _scores_on(0, 1, 0, single)
    results = spawn_ranks(_worker, 2)
    recalls = {k: v for k, v in single[0].items() if k != "seconds"}
    assert recalls["images"] == 5 and recalls["captions"] == 10
    for rank in (0, 1):
        assert {k: v for k, v in results[rank].items() if k != "seconds"} == recalls


def test_a_task_models_cnn_gets_the_cnn_optimizer_group():
    from pixelbert_dist.config import OptimConfig
    from pixelbert_dist.optim import param_groups

    model = _model("vqa")
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, OptimConfig())}
    assert id(model.body.visual.cnn.conv1.weight) in groups["cnn"]
    assert id(model.body.visual.proj.weight) in groups["cnn"]
    assert id(model.head[0].weight) in groups["transformer"]


def test_fine_tuning_flops_count_nlvr2s_two_images_per_pair():
    from pixelbert_dist.config import FinetuneConfig
    from pixelbert_dist.spec import ResolvedRun
    from pixelbert_dist.tasks import TASKS
    from pixelbert_dist.tokenizer import load_tokenizer

    vocab = Path(__file__).resolve().parents[1] / "data" / "pretrained-tiny" / "vocab.txt"
    tokenizer = load_tokenizer(str(vocab))
    model_cfg = ModelConfig(**{**vars(TINY), "vocab_size": len(tokenizer)})
    flops = {}
    for name in ("vqa", "nlvr2"):
        cfg = FinetuneConfig(model=model_cfg, data=DataConfig(image_short_side=128, image_long_side=192),
                             task=TaskConfig(name=name, answer_vocab="answers.json"))
        run = ResolvedRun(cfg, tokenizer, answers=("yes", "no"))
        model = TASKS[name].build_model(run, False)
        flops[name] = TASKS[name].flops_per_sample(model, run, torch.device("cpu"))
    # an NLVR2 pair is two images and two sequences through the same body: about twice a VQA pair
    assert 1.6 < flops["nlvr2"] / flops["vqa"] < 2.4
