"""The Python API (pretrained.py) on the shipped tiny export: from_pretrained, save_pretrained,
score, encode; and the ```python examples of docs/python-api.md, run as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.synthetic import generate
from pixelbert_dist import export
from pixelbert_dist.data.batch import resized_size
from pixelbert_dist.data.types import PretrainBatch, pad_images
from pixelbert_dist.model import PixelBert
from pixelbert_dist.pretrained import Preprocessing
from pixelbert_dist.tokenizer import encode_captions, load_tokenizer
from tests.launch import REPO

PRETRAINED = REPO / "tests" / "data" / "pretrained-tiny"  # make demo's model, exported (see its README)
DOCS = [REPO / "docs" / "python-api.md"]
CAPTIONS = ["a red square above a blue circle", "a yellow circle below two green circles",
            "two blue triangles below two blue squares", "three blue triangles below two red squares"]


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a docs page."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


EXAMPLES = [(path, i, block) for path in DOCS for i, block in enumerate(python_blocks(path))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out like the repository after the README's data step: data/synthetic/images
    (the first images of seed 0, the same for any --num-images) and tests/ (the fixture model)."""
    root = tmp_path_factory.mktemp("python-api")
    generate(root / "data" / "synthetic", 4, seed=0)
    (root / "tests").symlink_to(REPO / "tests")
    return root


@pytest.fixture(scope="module")
def images(workdir):
    """Four synthetic JPEGs of different sizes, captioned in CAPTIONS' order."""
    return sorted(str(p) for p in (workdir / "data" / "synthetic" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def model():
    return PixelBert.from_pretrained(PRETRAINED)


def test_the_docs_hold_an_example():
    assert EXAMPLES, "docs/python-api.md holds no ```python block"


@pytest.mark.parametrize("path,index,block", EXAMPLES, ids=[f"{p.name}:{i}" for p, i, _ in EXAMPLES])
def test_the_documented_example_runs_and_prints_what_it_says(path, index, block, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(block, f"{path.name} block {index}", "exec"), namespace)
    printed = re.search(r"print\(probs.*# tensor\(\[([^\]]*)\]\)", block)
    if printed:  # the numbers in the comment are the ones it prints
        claimed = torch.tensor([float(v) for v in printed.group(1).split(",")])
        assert torch.allclose(namespace["probs"], claimed, atol=1e-4), (namespace["probs"], claimed)


def test_loads_in_eval_mode_with_the_runs_tokenizer_and_preprocessing(model):
    assert not model.training and not any(m.training for m in model.modules())
    trained_with = load_tokenizer(str(PRETRAINED / "vocab.txt"))  # how the run loaded data.tokenizer
    assert model.tokenizer.get_vocab() == trained_with.get_vocab()
    assert model.tokenizer("Two RED circles")["input_ids"] == trained_with("Two RED circles")["input_ids"]
    # the run config's data section; pad_multiple predates the fixture's config: the default
    assert model.preprocessing == Preprocessing(image_short_side=128, image_long_side=192, pad_multiple=64,
                                                max_text_len=24)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_score_is_the_itm_probability_of_the_training_forward_on_the_same_batch(model, images):
    # the batch by hand: the training resize rule, pad_images, encode_captions, PretrainBatch
    pixels = []
    for path in images:
        with Image.open(path) as image:
            height, width = resized_size(image.height, image.width, 128, 192)
            resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    canvas, mask = pad_images(pixels, 64)
    text = encode_captions(model.tokenizer, CAPTIONS, 24)
    with torch.no_grad():
        logits = model(PretrainBatch(canvas, mask, text.input_ids, text.attention_mask)).itm_logits
    by_hand = logits.softmax(-1)[:, 1]
    assert torch.allclose(model.score(images, CAPTIONS), by_hand, atol=1e-6)
    assert not model.training


def test_a_path_and_a_pil_image_of_the_same_file_score_the_same(model, images):
    opened = [Image.open(path) for path in images]  # lazily decoded, as a user would pass them
    loaded = [Image.open(path).convert("RGB") for path in images]
    by_path = model.score(images, CAPTIONS)
    assert torch.equal(model.score(opened, CAPTIONS), by_path)
    assert torch.equal(model.score(loaded, CAPTIONS), by_path)
    assert torch.equal(model.score([Path(p) for p in images], CAPTIONS), by_path)


def test_batching_changes_no_number(model, images):
    pairs = [(image, caption) for image in images for caption in CAPTIONS]  # each image 4 times
    all_images, all_captions = [p[0] for p in pairs], [p[1] for p in pairs]
    together = model.score(all_images, all_captions)
    one_by_one = model.score(all_images, all_captions, batch_size=1)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert torch.allclose(model.score(all_images, all_captions, batch_size=5), one_by_one, atol=1e-5)
    # a repeated image shares one CNN pass; as distinct objects each has its own: the same numbers
    distinct = [Image.open(path) for path in all_images]
    assert torch.allclose(model.score(distinct, all_captions), together, atol=1e-5)
    # the matching caption of each image scores above the mean of the others (ITM ~0.65: not always)
    grid = together.view(4, 4)
    assert (grid.diagonal() > grid.mean(dim=1)).sum() >= 2

    many = model.encode(all_images, all_captions)
    single = model.encode(all_images, all_captions, batch_size=1)
    assert torch.allclose(many.pooled, single.pooled, atol=1e-5)
    for name in ("text", "visual"):
        a, b = getattr(many, name), getattr(single, name)
        mask_a, mask_b = getattr(many, f"{name}_mask"), getattr(single, f"{name}_mask")
        assert a.shape == b.shape and torch.equal(mask_a, mask_b), name  # padded to the widest in both
        assert torch.allclose(a[mask_a], b[mask_b], atol=1e-5), name
        assert not a[~mask_a].any(), name  # padding is zero


def test_encode_gives_the_features_the_itm_head_reads(model, images):
    features = model.encode(images, CAPTIONS)
    with torch.no_grad():
        from_pooled = model.cls.seq_relationship(features.pooled).softmax(-1)[:, 1]
    assert torch.allclose(from_pooled, model.score(images, CAPTIONS), atol=1e-6)
    hidden = model.cfg.hidden_size
    text = encode_captions(model.tokenizer, CAPTIONS, 24)
    assert features.text.shape == (4, text.input_ids.shape[1], hidden)
    assert torch.equal(features.text_mask, text.attention_mask.bool())
    for i, path in enumerate(images):  # one valid visual token per 64x64 cell of the resized image, top left
        with Image.open(path) as image:
            height, width = resized_size(image.height, image.width, 128, 192)
        rows, cols = -(-height // 64), -(-width // 64)
        assert features.visual_mask[i].sum() == rows * cols and features.visual_mask[i, :rows, :cols].all()
    assert features.visual.shape[:3] == features.visual_mask.shape and features.visual.shape[-1] == hidden


def test_save_pretrained_then_from_pretrained_gives_identical_outputs(model, images, tmp_path):
    saved = model.save_pretrained(tmp_path / "saved")
    assert {export.WEIGHTS, export.CONFIG, "tokenizer_config.json"} <= {p.name for p in saved.iterdir()}
    again = PixelBert.from_pretrained(saved)
    assert again.preprocessing == model.preprocessing and again.cfg == model.cfg
    assert again.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert torch.equal(again.score(images, CAPTIONS), model.score(images, CAPTIONS))
    assert torch.equal(again.encode(images, CAPTIONS).visual, model.encode(images, CAPTIONS).visual)
    # export's reader takes the same folder
    assert torch.equal(export.load_exported(saved).score(images, CAPTIONS), model.score(images, CAPTIONS))


def test_mistakes_are_named(model, images, tmp_path):
    with pytest.raises(ValueError, match="one caption per image"):
        model.score(images, CAPTIONS[:2])
    with pytest.raises(ValueError, match="one caption per image"):
        model.score(images[:1], CAPTIONS[0])
    with pytest.raises(TypeError, match="path or a PIL image"):
        model.score([torch.zeros(3, 64, 64)], CAPTIONS[:1])
    (tmp_path / "not-an-image.jpg").write_bytes(b"no jpeg here")
    with pytest.raises(ValueError, match="not-an-image.jpg: does not decode"):
        model.score([tmp_path / "not-an-image.jpg"], CAPTIONS[:1])
    with pytest.raises(FileNotFoundError):
        model.score([tmp_path / "missing.jpg"], CAPTIONS[:1])
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        PixelBert.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="no tokenizer"):
        PixelBert(model.cfg).score(images[:1], CAPTIONS[:1])
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red"]))
    with pytest.raises(ValueError, match="vocabulary of 114"):
        PixelBert.from_pretrained(PRETRAINED, tokenizer=tmp_path / "vocab.txt")
