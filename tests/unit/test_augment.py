"""Training augmentation (data/augment.py): draws from each image's identity, the flip's text swap,
exact resume on another world size, multi-scale masks and token grids, evaluation untouched.
The DALI path against the CPU path: tests/unit/test_dali_decode.py."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.shard import write_table
from data_pipeline.shard_format import FORMAT, MANIFEST, ShardWriter
from data_pipeline.storage import open_storage
from pixelbert_dist.config import ConfigError, DataConfig, FinetuneConfig, ModelConfig, TaskConfig
from pixelbert_dist.data.augment import Augmenter, Draw, apply, mirror_text
from pixelbert_dist.data.batch import BatchBuilder, decode_resize, resized_size
from pixelbert_dist.data.decode import CpuDecoder
from pixelbert_dist.data.plan import Manifest, Segment
from pixelbert_dist.data.stream import Pair, read_segment
from pixelbert_dist.data.task_batch import TaskBatchBuilder
from pixelbert_dist.data.types import IGNORE_INDEX, TOKEN_STRIDE
from pixelbert_dist.model import VisualEmbedding
from pixelbert_dist.spec import ResolvedRun
from pixelbert_dist.tasks import TASKS, task_model, vqa
from pixelbert_dist.tokenizer import SPECIAL_TOKENS, load_tokenizer
from tests.datasets import run_loaders

WORDS = ["a", "the", "dog", "cat", "on", "of", "left", "right", "leftover", "bright", "copyright", "outright",
         "sign", "is", "what", "side", "which", "hand", "-", ",", ".", "?", "red", "blue", "yes", "no"]
# (width, height) of the dataset's images: landscape, portrait, square, 2:1 both ways
SHAPES = [(120, 90), (90, 120), (100, 100), (160, 80), (80, 160)]
AUGMENTED = dict(augment_short_sides=[64, 96, 128], augment_flip=0.5, augment_color_jitter=0.3,
                 augment_randaugment=2)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n")
    return path


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """3 shards x 8 images x 2 captions, written without Ray; and each key's (height, width)."""
    root = tmp_path_factory.mktemp("augment")
    storage, shards, sizes = open_storage(str(root)), [], {}
    for s in range(3):
        name = f"{s:06d}.tar"
        buffer = io.BytesIO()
        writer = ShardWriter(buffer)
        for i in range(8):
            key = f"s{s}i{i}"
            width, height = SHAPES[(s + i) % len(SHAPES)]
            sizes[key] = (height, width)
            captions = [f"the dog on the left of the {'red' if i % 2 else 'blue'} sign", f"a cat on the right {i}"]
            meta = json.dumps({"captions": captions}).encode()
            writer.write(key, {"jpg": _jpeg(width, height, 10 * s + i), "json": meta})
        writer.close()
        storage.write_bytes(name, buffer.getvalue())
        table = write_table(storage, name, [{**e.to_manifest(), "captions": 2} for e in writer.samples])
        shards.append({"name": name, "index": f"{s:06d}.idx", "bytes": len(buffer.getvalue()),
                       "sha256": "", **table})
    storage.write_bytes(MANIFEST, json.dumps({"format": FORMAT, "num_shards": 3, "shards": shards}).encode())
    return root, sizes


def _cfg(vocab: Path, **changes) -> DataConfig:
    return DataConfig(tokenizer=str(vocab), max_text_len=16, image_short_side=64, image_long_side=160,
                      num_workers=0, **changes)


def test_a_draw_is_a_function_of_seed_epoch_shard_and_image_alone(vocab):
    cfg = _cfg(vocab, **AUGMENTED)
    keys = [(f"{s:06d}.tar", f"k{i}") for s in range(4) for i in range(50)]
    first = [Augmenter(cfg, seed=7, epoch=2).draw(*k) for k in keys]
    # another Augmenter (another worker, another rank, a resumed run), asked in another order
    again = Augmenter(cfg, seed=7, epoch=2)
    assert [again.draw(*k) for k in reversed(keys)][::-1] == first
    # no running generator: every image of the next epoch (or another seed) draws anew
    for other in (Augmenter(cfg, seed=7, epoch=3), Augmenter(cfg, seed=8, epoch=2)):
        assert sum(a != b for a, b in zip(first, (other.draw(*k) for k in keys))) > 0.9 * len(keys)
    # the draws cover the policy: every short side, both flips, warps and colours
    assert {d.short_side for d in first} == {64, 96, 128}
    assert 0.3 < np.mean([d.flip for d in first]) < 0.7
    assert any(d.warps for d in first) and any(d.equalize for d in first) and any(d.posterize < 8 for d in first)
    # jitter 0.3, then up to two RandAugment ops of 1 +- 0.27 (magnitude 9): mild, never an inversion
    assert all(0.7 * 0.73 ** 2 - 1e-6 <= factor <= 1.3 * 1.27 ** 2 + 1e-6
               for d in first for factor in (d.brightness, d.contrast, d.saturation))
    # one option turned on does not move the others' draws: flips and scales stay put
    more = Augmenter(dataclasses.replace(cfg, augment_randaugment=4, augment_color_jitter=0.0), seed=7, epoch=2)
    assert [(d.flip, d.short_side) for d in first] == [(d.flip, d.short_side) for d in (more.draw(*k) for k in keys)]
    # off (the paper's pre-training, and every evaluation config): nothing is drawn
    assert Augmenter(_cfg(vocab), seed=7, epoch=2).draw(*keys[0]) is None
    # settings outside the policy are refused, naming the key
    for bad, key in [(dict(augment_short_sides=[64, 400]), "data.augment_short_sides"),
                     (dict(augment_flip=1.5), "data.augment_flip"),
                     (dict(augment_randaugment_magnitude=31), "data.augment_randaugment_magnitude")]:
        with pytest.raises(ConfigError, match=key):
            _cfg(vocab, **bad)


def test_a_flip_swaps_left_and_right_in_the_tokens_and_nothing_else(vocab):
    tokenizer = load_tokenizer(str(vocab))
    builder = BatchBuilder(tokenizer, _cfg(vocab))
    # near misses that must stay: words containing left/right, a hyphenated "right-hand", upper case
    caption = "LEFT of the leftover bright sign, the right-hand copyright is outright Left . right"
    pair = Pair("000000.tar", 3, "k", b"", caption)
    mirrored = builder.mirror(pair)
    assert mirrored.caption == "RIGHT of the leftover bright sign, the left-hand copyright is outright Right . left"
    assert (mirrored.shard, mirrored.index, mirrored.key) == (pair.shard, pair.index, pair.key)
    before, after = (tokenizer(text)["input_ids"] for text in (pair.caption, mirrored.caption))
    left, right = tokenizer.convert_tokens_to_ids(["left", "right"])
    assert len(before) == len(after) and tokenizer.unk_token_id not in before
    swapped = {left: right, right: left}
    assert [swapped.get(t, t) for t in before] == after
    assert sum(t in swapped for t in before) == 4  # the four whole words, nothing else
    assert mirror_text(mirror_text(caption)) == caption
    # fine-tuning: VQA's question and its answers turn with the image; retrieval's caption too
    answers = ["left", "left", "right", "yes"]
    question = Pair("000000.tar", 0, "q", b"", "which side is the dog on ? left or right", {"answers": answers})
    vqa_builder = TaskBatchBuilder(tokenizer, _cfg(vocab), TaskConfig(name="vqa", answer_vocab="a.json"),
                                   answers=["left", "right", "yes"])
    flipped = vqa_builder.mirror(question)
    assert flipped.caption == "which side is the dog on ? right or left"
    assert flipped.target["answers"] == ["right", "right", "left", "yes"] and question.target["answers"] == answers
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    labels = vqa_builder([flipped], [image], torch.Generator()).labels[0]
    assert labels.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])  # "right" now has the two votes
    retrieval = TaskBatchBuilder(tokenizer, _cfg(vocab), TaskConfig(name="retrieval"))
    assert retrieval.mirror(pair).caption == mirrored.caption
    # NLVR2: its sentences name the left and right image; a flip is refused, not applied
    nlvr2 = TaskBatchBuilder(tokenizer, _cfg(vocab), TaskConfig(name="nlvr2"))
    with pytest.raises(ConfigError, match="NLVR2 sample k of 000000.tar"):
        nlvr2.mirror(pair)
    cfg = FinetuneConfig(data=_cfg(vocab, augment_flip=0.5), task=TaskConfig(name="nlvr2"))
    with pytest.raises(ConfigError, match="data.augment_flip must be 0"):
        TASKS["nlvr2"].resolve(cfg, tokenizer)


def test_the_decode_stage_flips_each_image_with_its_text(vocab, dataset):
    root, _ = dataset
    builder = BatchBuilder(load_tokenizer(str(vocab)), _cfg(vocab, augment_flip=1.0))
    plain = BatchBuilder(load_tokenizer(str(vocab)), _cfg(vocab))
    pairs = list(read_segment(Manifest(str(root)), Segment("000001.tar", 0, 6)))
    decoded = list(CpuDecoder().decode(pairs, builder, seed=1, epoch=0))
    for pair, (seen, image) in zip(pairs, decoded):
        assert seen.caption == mirror_text(pair.caption) != pair.caption
        assert torch.equal(image, plain.image(pair).flip(-1))  # the very pixels, mirrored


def _run(root, cfg, world, batch=4, state=None, stop=None, workers=0):
    """The ranks' (batch, info) items of every step, in order, and the merged state."""
    steps, state = run_loaders(root, cfg, world, workers, batch, state, stop)
    return [item for step in steps for item in step], state


def _per_pair(items) -> dict[tuple[str, int], tuple[torch.Tensor, list[int] | None]]:
    """(shard, pair) -> (its image row, cropped to the mask; its caption tokens before MLM masking
    if it was a matching pair)."""
    out = {}
    for batch, info in items:
        rows = batch.image_index.tolist() if batch.image_index is not None else range(len(info.pairs))
        for i, (pair, row) in enumerate(zip(info.pairs, rows)):
            height, width = int(batch.pixel_mask[row].any(1).sum()), int(batch.pixel_mask[row].any(0).sum())
            tokens = None
            if batch.itm_labels[i] == 1:
                ids = torch.where(batch.mlm_labels[i] != IGNORE_INDEX, batch.mlm_labels[i], batch.input_ids[i])
                tokens = ids[batch.attention_mask[i].bool()].tolist()
            out[tuple(pair)] = (batch.images[row, :, :height, :width], tokens)
    return out


def test_resume_on_another_world_size_gives_each_pair_the_same_augmented_image_and_text(vocab, dataset):
    root, sizes = dataset
    cfg = _cfg(vocab, **AUGMENTED)
    whole, _ = _run(root, cfg, world=1)
    first, state = _run(root, cfg, world=1, stop=3)
    rest, _ = _run(root, cfg, world=2, state=state)
    reference = _per_pair(whole)
    resumed = _per_pair(first + rest)
    assert len(resumed) >= len(reference) - 2 * 4  # at most a batch per rank dropped at the end
    compared = 0
    for pair, (image, tokens) in resumed.items():
        if pair not in reference:
            continue
        assert torch.equal(image, reference[pair][0]), pair  # pixel-identical
        if tokens is not None and reference[pair][1] is not None:
            assert tokens == reference[pair][1], pair
            compared += 1
    assert compared > 5
    # the check can fail: the draws did augment (some mirrored captions, some warped or recoloured)
    tokenizer = load_tokenizer(str(vocab))
    texts = [tokenizer.decode(t) for _, t in reference.values() if t is not None]
    assert any("dog on the right" in t for t in texts) and any("dog on the left" in t for t in texts)

    # multi-scale: each image row's mask is exactly its drawn size, top-left, long side capped,
    # the canvas a multiple of data.pad_multiple, and the model's token grid covers it
    model = VisualEmbedding(ModelConfig(backbone="custom", backbone_widths=[4, 4, 8, 8], hidden_size=8,
                                        num_heads=2, num_layers=1, vocab_size=40)).eval()
    augmenter = Augmenter(cfg, seed=1, epoch=0)
    seen_sides = set()
    for batch, info in whole[:4]:
        assert batch.images.shape[-2] % cfg.pad_multiple == 0 and batch.images.shape[-1] % cfg.pad_multiple == 0
        with torch.no_grad():
            tokens, token_mask = model(batch.images, batch.pixel_mask)
        rows = batch.image_index.tolist() if batch.image_index is not None else range(len(info.keys))
        for (shard, _), key, row in zip(info.pairs, info.keys, rows):
            draw = augmenter.draw(shard, key)
            height, width = resized_size(*sizes[key], draw.short_side, cfg.image_long_side)
            seen_sides.add(draw.short_side)
            mask = batch.pixel_mask[row]
            assert int(mask.sum()) == height * width and bool(mask[:height, :width].all()), key
            assert int(token_mask[row].sum()) == math.ceil(height / TOKEN_STRIDE) * math.ceil(width / TOKEN_STRIDE)
        assert torch.isfinite(tokens).all()
    assert len(seen_sides) > 1


def test_the_dali_path_gets_the_same_draws_through_the_loader(vocab, dataset):
    # the draws travel from a loader worker process with the JPEG bytes; the pairs are mirrored there
    pytest.importorskip("nvidia.dali")
    root, _ = dataset
    cfg = _cfg(vocab, **AUGMENTED)
    cpu = _per_pair(_run(root, cfg, world=1, stop=3)[0])
    dali = _per_pair(_run(root, dataclasses.replace(cfg, decoder="dali"), world=1, stop=3, workers=1)[0])
    assert cpu.keys() == dali.keys()
    gaps = []
    for pair, (image, tokens) in dali.items():
        assert image.shape == cpu[pair][0].shape, pair  # the same drawn size
        assert tokens == cpu[pair][1], pair  # the same mirrored text
        gaps.append((image.int() - cpu[pair][0].int()).abs().float().mean())
    # Measured: mean 0.0-0.3 levels per image (PIL's resize against DALI's, then the same
    # augmentation); a flip missed on one path gives ~45
    assert max(gaps) <= 1.5


def test_evaluation_never_augments(vocab, dataset):
    # VQA's evaluation with every augmentation at full strength in the config: the batches the
    # model sees are the plain decode and the questions as written
    root, _ = dataset
    tokenizer = load_tokenizer(str(vocab))
    data = _cfg(vocab, augment_short_sides=[96, 128], augment_flip=1.0, augment_color_jitter=0.9,
                augment_randaugment=4, augment_randaugment_magnitude=30)
    cfg = FinetuneConfig(data=data, task=TaskConfig(name="vqa", answer_vocab="a.json", eval_batch_size=4))
    run = ResolvedRun(cfg, tokenizer, ("left", "right", "yes"))
    model = task_model(ModelConfig(backbone="custom", backbone_widths=[4, 4, 8, 8], hidden_size=8, num_heads=2,
                                   num_layers=1, intermediate_size=16, vocab_size=len(tokenizer),
                                   max_position_embeddings=32), cfg.task, num_answers=3)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    jpeg = _jpeg(120, 90, 0)
    pairs = [Pair("000000.tar", i, f"q{i}", jpeg, "is the dog on the left ?", {"answers": ["left"] * 10})
             for i in range(4)]
    vqa.run_evaluation(model, pairs, run, torch.device("cpu"))
    assert len(seen) == 1
    plain = decode_resize(jpeg, data.image_short_side, data.image_long_side)
    height, width = plain.shape[-2:]
    assert seen[0].pixel_mask[0].sum() == height * width
    assert torch.equal(seen[0].images[0, :, :height, :width], plain)
    assert tokenizer.convert_tokens_to_ids("left") in seen[0].input_ids[0].tolist()
    assert tokenizer.convert_tokens_to_ids("right") not in seen[0].input_ids[0].tolist()
    # the same builder augments when the training loader hands it a draw: the check can fail
    draw = Augmenter(data, seed=0, epoch=0).draw("000000.tar", "q0")
    assert not torch.equal(apply(decode_resize(jpeg, draw.short_side, data.image_long_side), draw), plain)
    assert isinstance(draw, Draw)
