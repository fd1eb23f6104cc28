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
