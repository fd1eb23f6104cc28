import pytest
import torch

from pixelbert_dist.targets import SpecialTokens, itm_caption_assignment, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = SpecialTokens(mask_id=MASK, special_ids=(PAD, UNK, CLS, SEP, MASK), vocab_size=1000)


def _captions(n=4000, length=20, gen=None):
    ids = torch.randint(5, 1000, (n, length), generator=gen)
    lengths = torch.randint(5, length + 1, (n,), generator=gen)
    mask = torch.arange(length)[None] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(n), lengths - 1] = SEP
    ids[~mask] = PAD
    return ids, mask.long()


def test_masking_rate_and_80_10_10_split():
    gen = torch.Generator().manual_seed(0)
    ids, attention = _captions(gen=gen)
    masked, labels = mask_tokens(ids, attention, SPECIAL, 0.15, gen)
    eligible = attention.bool() & (ids != CLS) & (ids != SEP)
    selected = labels != -100
    rate = selected.sum() / eligible.sum()
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    n = selected.sum().item()
    as_mask = (masked[selected] == MASK).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    randomized = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.02  # a random draw equal to the original adds ~0.01%
    assert abs(randomized - 0.1) < 0.02
    assert torch.equal(masked[~selected], ids[~selected])


def test_special_tokens_and_padding_are_never_masked():
    gen = torch.Generator().manual_seed(1)
    ids, attention = _captions(gen=gen)
    _, labels = mask_tokens(ids, attention, SPECIAL, 0.9, gen)
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    assert (labels[special] == -100).all()
    assert (labels[~attention.bool()] == -100).all()


def test_masking_is_reproducible_from_the_seed():
    ids, attention = _captions(n=64)
    a = mask_tokens(ids, attention, SPECIAL, 0.15, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, attention, SPECIAL, 0.15, torch.Generator().manual_seed(7))
    c = mask_tokens(ids, attention, SPECIAL, 0.15, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_itm_negatives_never_pair_an_image_with_its_own_caption():
    gen = torch.Generator().manual_seed(0)
    # four captions per image, as captions_per_image=4 batches will have
    keys = [f"img{i // 4}" for i in range(32)]
    for _ in range(200):
        caption, label = itm_caption_assignment(keys, 0.5, gen)
        assert label.sum() == 16
        for i in range(32):
            same_image = keys[caption[i]] == keys[i]
            assert same_image == bool(label[i]), (i, caption[i].item(), label[i].item())
            if label[i]:
                assert caption[i] == i


def test_itm_negatives_vary_and_are_seeded():
    keys = [f"k{i}" for i in range(16)]
    a = itm_caption_assignment(keys, 0.5, torch.Generator().manual_seed(1))
    b = itm_caption_assignment(keys, 0.5, torch.Generator().manual_seed(1))
    c = itm_caption_assignment(keys, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_itm_needs_two_images():
    with pytest.raises(ValueError, match="at least two distinct images.*'only'"):
        itm_caption_assignment(["only", "only"], 0.5, torch.Generator())
