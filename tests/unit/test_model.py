import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from transformers import BertConfig, BertModel

from pixelbert_dist.flops import synthetic_batch
from pixelbert_dist.model import (TOKEN_STRIDE, PixelBert, PretrainBatch, bert_config, pad_images,
                                  sample_visual_tokens)


def _batch(vocab_size, sizes, text_len=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images, mask = pad_images([torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                               for h, w in sizes])
    n = len(sizes)
    input_ids = torch.randint(5, vocab_size, (n, text_len), generator=gen)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2:5] = input_ids[:, 2:5]
    return PretrainBatch(images, mask, input_ids, torch.ones(n, text_len, dtype=torch.long),
                         labels, torch.tensor([1, 0] * (n // 2) + [1] * (n % 2)))


def test_forward_shapes_finite_losses_and_gradients_reach_the_backbone(tiny_cfg):
    model = PixelBert(tiny_cfg.model).train()
    batch = _batch(tiny_cfg.model.vocab_size, [(224, 300), (256, 224), (192, 448)])
    out = model(batch)
    for name in ("loss", "mlm_loss", "mlm_accuracy", "itm_loss", "itm_accuracy"):
        value = getattr(out, name)
        assert value.shape == () and torch.isfinite(value), name
    assert torch.allclose(out.loss, out.mlm_loss + out.itm_loss)
    assert out.itm_logits.shape == (3, 2) and out.pooled.shape == (3, tiny_cfg.model.hidden_size)
    out.loss.backward()
    stem = model.visual.cnn.conv1.weight.grad
    assert stem is not None and stem.abs().sum() > 0
    assert model.visual.semantic_embedding.grad.abs().sum() > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_mlm_decoder_is_tied_to_word_embeddings(tiny_cfg):
    model = PixelBert(tiny_cfg.model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_backbone_norms_frozen_by_default_and_trainable_as_an_option(tiny_cfg):
    from pixelbert_dist.config import ModelConfig
    assert ModelConfig().train_backbone_norm is False  # the default, as in the paper configs
    frozen = PixelBert(dataclasses.replace(tiny_cfg.model, train_backbone_norm=False))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.visual.cnn.modules())
    trainable = PixelBert(dataclasses.replace(tiny_cfg.model, train_backbone_norm=True))
    norms = [m for m in trainable.visual.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad for m in norms)


def _tokens_and_mask(model, sizes):
    images, mask = pad_images([torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes])
    return model.visual(images, mask)


def test_token_grid_has_stride_64_and_marks_padding(tiny_cfg):
    model = PixelBert(tiny_cfg.model).eval()
    tokens, valid = _tokens_and_mask(model, [(640, 640), (130, 200)])
    assert tokens.shape == (2, 100, tiny_cfg.model.hidden_size)
    assert valid[0].all()
    # 130x200 px -> ceil(130/64) x ceil(200/64) = 3 x 4 cells, top-left in the 10x10 grid
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(valid[1].view(10, 10), expected)
    assert tokens[1][~valid[1]].abs().sum() == 0


def test_pixel_sampling_takes_only_valid_tokens_exact_count_fresh_draws():
    hidden = 8
    tokens = torch.arange(2 * 400 * hidden, dtype=torch.float).view(2, 400, hidden)
    valid = torch.zeros(2, 400, dtype=torch.bool)
    valid[0, :300] = True
    valid[1, 50:350] = True
    torch.manual_seed(0)
    picked, picked_valid = sample_visual_tokens(tokens, valid, 100)
    assert picked.shape == (2, 100, hidden) and picked_valid.all()
    ids = (picked[..., 0] / hidden).long() % 400  # recover each token's index
    assert all(valid[i, ids[i]].all() for i in range(2))
    assert all(len(set(ids[i].tolist())) == 100 for i in range(2))  # without replacement
    assert set(ids[0].tolist()) != set((ids[1] - 50).tolist())      # each image draws on its own
    again, _ = sample_visual_tokens(tokens, valid, 100)
    assert not torch.equal(again, picked)                           # and anew at every call


def test_pixel_sampling_spreads_uniformly_over_valid_tokens():
    valid = torch.zeros(1, 40, dtype=torch.bool)
    valid[0, 10:30] = True
    tokens = torch.arange(40, dtype=torch.float).view(1, 40, 1)
    counts = torch.zeros(40)
    torch.manual_seed(1)
    for _ in range(2000):
        picked, _ = sample_visual_tokens(tokens, valid, 5)
        counts[picked[0, :, 0].long()] += 1
    assert counts[~valid[0]].sum() == 0
    expected = 2000 * 5 / 20
    assert ((counts[valid[0]] - expected).abs() / expected).max() < 0.15


def test_image_with_fewer_valid_tokens_than_count_keeps_all_of_them():
    tokens = torch.randn(1, 30, 4)
    valid = torch.zeros(1, 30, dtype=torch.bool)
    valid[0, :12] = True
    picked, picked_valid = sample_visual_tokens(tokens, valid, 20)
    assert picked.shape == (1, 20, 4) and picked_valid.sum() == 12


def test_model_samples_configured_count_in_training_and_all_tokens_in_eval(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, pixel_sample_count=20)
    model = PixelBert(cfg)
    seen = []
    model.bert.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    batch = _batch(cfg.vocab_size, [(448, 448), (384, 512)], text_len=10)
    model.train()(batch)
    model.eval()(batch)
    assert seen == [10 + 20, 10 + 56]  # every cell of the 448x512 canvas (7x8) in eval


def test_padding_the_same_image_two_ways_gives_the_same_output_in_eval(tiny_cfg):
    model = PixelBert(tiny_cfg.model).eval()
    image = torch.randint(0, 256, (3, 200, 290), dtype=torch.uint8)
    other = torch.randint(0, 256, (3, 320, 448), dtype=torch.uint8)
    text = _batch(tiny_cfg.model.vocab_size, [(64, 64)] * 2)
    outputs = []
    for companions in ([], [other]):
        images, mask = pad_images([image, *companions])
        n = 1 + len(companions)
        batch = PretrainBatch(images, mask, text.input_ids[:1].expand(n, -1),
                              text.attention_mask[:1].expand(n, -1))
        with torch.no_grad():
            outputs.append(model(batch).pooled[0])
    assert outputs[0].shape == outputs[1].shape
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5), (outputs[0] - outputs[1]).abs().max()


def test_the_model_normalizes_uint8_pixels_with_imagenet_statistics_and_refuses_floats(tiny_cfg):
    from torchvision.transforms.v2 import functional as TF
    model = PixelBert(tiny_cfg.model).eval()
    small = torch.randint(0, 256, (3, 64, 100), dtype=torch.uint8)
    images, mask = pad_images([small, torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)])
    normalized = model.visual.normalize(images, mask)
    expected = TF.normalize(small.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(normalized[0, :, :64, :100], expected)
    assert normalized[0, :, 64:].abs().sum() == 0 and normalized[0, :, :, 100:].abs().sum() == 0
    with pytest.raises(TypeError, match="uint8"):
        model.visual(images.float(), mask)


def test_image_smaller_than_one_token_cell_is_a_clear_error(tiny_cfg):
    model = PixelBert(tiny_cfg.model)
    batch = _batch(tiny_cfg.model.vocab_size, [(256, 256), (40, 300)])
    with pytest.raises(ValueError, match=r"image 1 of the batch is 40x300 pixels, smaller than one visual token cell"):
        model(batch)


def test_visual_position_embedding_option(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, visual_position_embedding=True, max_visual_grid=4)
    model = PixelBert(cfg).eval()
    assert model.visual.row_embedding.shape == (4, cfg.hidden_size)
    _tokens_and_mask(model, [(256, 256)])
    with pytest.raises(ValueError, match="exceeds model.max_visual_grid=4"):
        _tokens_and_mask(model, [(320, 256)])


def test_text_side_matches_transformers_bert_after_loading_its_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model
    torch.manual_seed(3)
    reference = BertModel(bert_config(cfg), add_pooling_layer=True).eval()
    reference.save_pretrained(tmp_path / "bert")
    model = PixelBert(dataclasses.replace(cfg, text_weights=str(tmp_path / "bert"))).eval()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, cfg.vocab_size, (3, 12), generator=gen)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    with torch.no_grad():
        ours = model.fuse(input_ids, attention_mask)
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = attention_mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-5), (ours[keep] - theirs[keep]).abs().max()


def test_text_weights_of_another_shape_are_refused_by_name(tiny_cfg, tmp_path):
    other = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128)
    BertModel(other).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"bert.embeddings.word_embeddings.weight has shape \(500, 64\)"):
        PixelBert(dataclasses.replace(tiny_cfg.model, text_weights=str(tmp_path / "bert")))


def test_resnet50_backbone_equals_torchvision_with_the_same_weights(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, backbone="resnet50")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    for m in reference.modules():  # non-trivial statistics so frozen norms matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model = PixelBert(cfg).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = model.visual.cnn.load_state_dict(state, strict=False)
    assert not missing and all(k.endswith("num_batches_tracked") for k in unexpected)
    images = torch.randn(2, 3, 128, 192)
    stage4 = create_feature_extractor(reference, ["layer4"])
    with torch.no_grad():
        ours = model.visual.cnn_features(images)
        theirs = stage4(images)["layer4"]
    assert ours.shape == theirs.shape == (2, 2048, 4, 6)
    # FrozenBatchNorm2d folds the statistics in another order than BatchNorm2d: float noise only.
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    assert theirs.abs().max() > 0


def test_resnext152_is_torchvisions_resnet_with_the_paper_layout(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, backbone="resnext152_32x8d")
    cnn = PixelBert(cfg).visual.cnn
    assert [len(getattr(cnn, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    conv = cnn.layer1[0].conv2
    assert conv.groups == 32 and conv.in_channels == 256  # 64 planes * 8/64 * 32 groups
    assert not hasattr(cnn, "fc")


def test_synthetic_batch_runs_through_the_model(tiny_cfg):
    model = PixelBert(tiny_cfg.model).train()
    batch = synthetic_batch(tiny_cfg.model.vocab_size, 2, (TOKEN_STRIDE * 3, TOKEN_STRIDE * 4), 12)
    assert torch.isfinite(model(batch).loss)


def test_paper_r50_config_has_the_names_and_shapes_of_bert_base_and_torchvision_resnet50():
    # What makes `text_weights: bert-base-uncased` and `backbone_weights: imagenet` load by name,
    # checked offline against randomly initialised reference models of the same architecture.
    from pixelbert_dist.config import load_config
    from tests.conftest import REPO
    from transformers import BertForPreTraining
    cfg = load_config(REPO / "configs/pretrain/r50-coco-vg.yaml",
                      ["--model.backbone_weights=none", "--model.text_weights=none"])
    model = PixelBert(cfg.model)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    bert = {k: v.shape for k, v in BertForPreTraining(bert_config(cfg.model)).state_dict().items()}
    assert {k: ours.get(k) for k in bert} == bert
    resnet = {f"visual.cnn.{k}": v.shape for k, v in torchvision.models.resnet50().state_dict().items()
              if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k: ours.get(k) for k in resnet} == resnet


def test_backbone_weights_file_loads_strictly(tiny_cfg, tmp_path):
    from safetensors.torch import save_file
    source = PixelBert(tiny_cfg.model).visual.cnn
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "cnn.safetensors")
    loaded = PixelBert(dataclasses.replace(tiny_cfg.model, backbone_weights=str(tmp_path / "cnn.safetensors")))
    for (name, a), b in zip(source.state_dict().items(), loaded.visual.cnn.state_dict().values()):
        assert torch.equal(a, b), name
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"backbone_weights=.*wrong.pt does not fit model.backbone"):
        PixelBert(dataclasses.replace(tiny_cfg.model, backbone_weights=str(tmp_path / "wrong.pt")))


def test_every_trainable_parameter_gets_a_gradient_even_without_masked_tokens(tiny_cfg):
    # Data-parallel gradient reduction needs the same parameters on every rank at every step.
    model = PixelBert(tiny_cfg.model).train()
    batch = _batch(tiny_cfg.model.vocab_size, [(128, 128), (128, 192)])
    batch.mlm_labels.fill_(-100)
    model(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_pairs_sharing_an_image_row_equal_pairs_with_their_own_copy(tiny_cfg):
    model = PixelBert(tiny_cfg.model).eval()  # eval: every token, no random pixel sampling
    batch = synthetic_batch(tiny_cfg.model.vocab_size, 2, (128, 192), 10)
    index = torch.tensor([0, 0, 1, 0])
    shared = PretrainBatch(batch.images, batch.pixel_mask, batch.input_ids[index], batch.attention_mask[index],
                           image_index=index)
    copied = PretrainBatch(batch.images[index], batch.pixel_mask[index], batch.input_ids[index],
                           batch.attention_mask[index])
    with torch.no_grad():
        torch.testing.assert_close(model(shared).itm_logits, model(copied).itm_logits)


def test_mlm_loss_counts_matched_pairs_only_unless_mlm_on_mismatched(tiny_cfg):
    # One model, two objectives (the option only changes which labels reach the loss), checked
    # against cross-entropy by hand on the same hidden states.
    batch = _batch(tiny_cfg.model.vocab_size, [(128, 128), (128, 192), (192, 128), (128, 128)])
    batch.mlm_labels[:, 2:8] = batch.input_ids[:, 2:8]  # every caption masked, mismatched ones too
    batch.itm_labels = torch.tensor([1, 0, 1, 0])
    model = PixelBert(tiny_cfg.model).eval()  # eval: no pixel sampling, the same hidden states each call
    with torch.no_grad():
        visual, visual_mask = model.visual(batch.images, batch.pixel_mask)
        text = model.fuse(batch.input_ids, batch.attention_mask, visual, visual_mask)[:, :10]
        logits = model.cls.predictions(text).float()
    # the head predicts half the matched pairs' masked words and all of the mismatched ones':
    # accuracy over matched pairs is 50%, over every pair 75%
    guess = logits.argmax(-1)
    batch.mlm_labels[:, 2:8] = guess[:, 2:8]
    batch.mlm_labels[[0, 2], 5:8] = (guess[[0, 2], 5:8] + 1) % tiny_cfg.model.vocab_size
    by_hand = torch.nn.functional.cross_entropy(logits[:, 2:8].transpose(1, 2), batch.mlm_labels[:, 2:8],
                                                reduction="none")
    matched_only, every_pair = by_hand[[0, 2]].mean(), by_hand.mean()
    assert not torch.isclose(matched_only, every_pair, rtol=1e-3)  # the check can tell them apart

    out = model(batch)
    torch.testing.assert_close(out.mlm_loss, matched_only)
    assert out.mlm_accuracy == 50.0  # in %, as every accuracy we log
    model.cfg = dataclasses.replace(tiny_cfg.model, mlm_on_mismatched=True)
    out = model(batch)
    torch.testing.assert_close(out.mlm_loss, every_pair)
    assert out.mlm_accuracy == 50.0  # still over matched pairs: both objectives report the same measure
    # without ITM labels (a batch of matched pairs only) every label counts
    model.cfg = tiny_cfg.model
    batch.itm_labels = None
    torch.testing.assert_close(model(batch).mlm_loss, every_pair)


def test_itm_accuracy_is_a_percentage(tiny_cfg):
    model = PixelBert(tiny_cfg.model).eval()  # eval: no pixel sampling, the same logits each call
    batch = _batch(tiny_cfg.model.vocab_size, [(128, 128), (128, 192), (192, 128), (128, 128)])
    with torch.no_grad():
        guess = model(batch).itm_logits.argmax(-1)
    batch.itm_labels = guess.clone()
    batch.itm_labels[0] = 1 - guess[0]  # 3 of 4 pairs predicted right
    assert model(batch).itm_accuracy == 75.0


def test_a_rank_without_a_matched_masked_token_still_reaches_the_mlm_head(tiny_cfg):
    model = PixelBert(tiny_cfg.model).train()
    batch = _batch(tiny_cfg.model.vocab_size, [(128, 128), (128, 192)])
    batch.itm_labels = torch.tensor([0, 0])  # masked words on mismatched pairs only: none counted
    out = model(batch)
    assert out.mlm_loss == 0 and out.mlm_accuracy == 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
