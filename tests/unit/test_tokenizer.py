import pytest

from pixelbert_dist.tokenizer import encode_captions, load_tokenizer, special_tokens, train_wordpiece

CAPTIONS = ["two red circles left of a blue square", "one green triangle above three yellow squares",
            "a blue circle right of two red triangles"] * 20


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return train_wordpiece(CAPTIONS, 120, tmp_path_factory.mktemp("vocab"))


def test_trained_vocab_loads_from_file_and_folder_and_tokenizes_real_words(vocab):
    for source in (vocab, vocab.parent):
        tok = load_tokenizer(str(source))
        ids = tok("two red circles")["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids[1:3]) == ["two", "red"]


def test_special_tokens_cover_mask_and_padding(vocab):
    tok = load_tokenizer(str(vocab))
    special = special_tokens(tok)
    assert special.mask_id == tok.mask_token_id
    assert {tok.pad_token_id, tok.cls_token_id, tok.sep_token_id} <= set(special.special_ids)
    assert special.vocab_size == len(tok)


def test_long_captions_are_truncated_and_counted(vocab):
    tok = load_tokenizer(str(vocab))
    out = encode_captions(tok, ["two red circles", " ".join(["blue square"] * 30)], max_len=8)
    assert out.input_ids.shape == (2, 8)
    assert out.num_truncated == 1
    assert out.input_ids[1, -1] == tok.sep_token_id
    assert out.attention_mask[0].sum() == 5 and out.input_ids[0, 5:].eq(tok.pad_token_id).all()


def test_empty_caption_is_an_error_naming_the_key(vocab):
    tok = load_tokenizer(str(vocab))
    with pytest.raises(ValueError, match="caption of coco-42 is empty"):
        encode_captions(tok, ["two red circles", "  "], 8, keys=["coco-1", "coco-42"])


def test_a_file_that_is_not_a_vocab_is_refused(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="lacks BERT's special tokens"):
        load_tokenizer(str(bad))


# ------------------------------------------------------------------ a tokenizer that cannot be loaded

def test_a_tokenizer_that_cannot_be_loaded_names_what_was_tried_and_the_fix(tmp_path, monkeypatch):
    """A missing file, an empty folder, and a hub name on a machine without the hub: each a
    ConfigError at once (not a 5-entry tokenizer, not minutes of retries) that names the fix."""
    import time

    import huggingface_hub.constants as hub

    from pixelbert_dist.config import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    fix = "python -m pixelbert_dist.tokenizer --captions"
    with pytest.raises(ConfigError, match=f"data/synthetic/vocab.txt: no such file or folder \\(from {tmp_path}\\)"
                                          f".*{fix}"):
        load_tokenizer("data/synthetic/vocab.txt")
    with pytest.raises(ConfigError, match=f"empty: the folder has no vocab.txt.*{fix}"):
        load_tokenizer("empty")
    started = time.monotonic()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=f"pixelbert-test/no-such-bert: not in the hub cache and HF_HUB_OFFLINE "
                                          f"is set.*hf download.*{fix}"):
        load_tokenizer("pixelbert-test/no-such-bert")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ConfigError, match=r"no-such-bert: not in the hub cache and http://127.0.0.1:9 cannot be "
                                          r"reached \(tried: a file or folder no-such-bert"):
        load_tokenizer("no-such-bert")
    assert time.monotonic() - started < 10  # no retry loop
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written where it ran


def test_fine_tuning_takes_the_pretrained_models_tokenizer_unless_data_tokenizer_is_set(vocab, tmp_path):
    """task.init's vocab (114 entries) when data.tokenizer is left at its default; a vocab set
    explicitly is used, and refused when its size is not the pre-trained one."""
    from pixelbert_dist.config import ConfigError, load_config
    from pixelbert_dist.config.schema import FinetuneConfig
    from pixelbert_dist.tasks import base
    from tests.launch import REPO

    pretrained = REPO / "tests" / "data" / "pretrained-tiny"
    config = REPO / "configs" / "finetune" / "tiny-cpu.yaml"
    cfg = load_config(config, [f"--task.init={pretrained}", "--data.tokenizer=bert-base-uncased"],
                      schema=FinetuneConfig)
    tokenizer = base.tokenizer(cfg)  # bert-base-uncased is not here: the hub is never asked
    assert len(tokenizer) == 114
    run = base.resolve(cfg, tokenizer)
    assert run.cfg.data.tokenizer == str(pretrained)  # what the loader's workers load
    assert cfg.data.tokenizer == "bert-base-uncased"  # the config as loaded is not written to
    explicit = load_config(config, [f"--task.init={pretrained}", f"--data.tokenizer={vocab}"], schema=FinetuneConfig)
    assert base.tokenizer_source(explicit) == str(vocab)
    with pytest.raises(ConfigError, match=f"tokenizer {vocab} has {len(load_tokenizer(str(vocab)))} entries; "
                                          f"{pretrained} was pre-trained with a vocabulary of 114: leave "
                                          f"data.tokenizer unset"):
        base.resolve(explicit, base.tokenizer(explicit))


def test_a_tokenizer_smaller_than_the_models_vocabulary_is_refused(vocab):
    from pixelbert_dist.config import ConfigError, load_config
    from pixelbert_dist.pretraining import resolve
    from tests.launch import REPO

    cfg = load_config(REPO / "configs" / "pretrain" / "tiny-cpu.yaml", ["--model.vocab_size=114",
                                                                        f"--data.tokenizer={vocab}"])
    size = len(load_tokenizer(str(vocab)))
    with pytest.raises(ConfigError, match=f"model.vocab_size is 114 but the tokenizer {vocab} has {size} entries: "
                                          f"set --model.vocab_size=0"):
        resolve(cfg, load_tokenizer(str(vocab)))
    assert resolve(load_config(REPO / "configs" / "pretrain" / "tiny-cpu.yaml", [f"--data.tokenizer={vocab}"]),
                   load_tokenizer(str(vocab))).cfg.model.vocab_size == size  # 0: the tokenizer's
