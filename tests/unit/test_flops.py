import dataclasses

from pixelbert_dist.flops import measure_flops, synthetic_batch
from pixelbert_dist.model import PixelBert


def _eval_flops(cfg, batch_size, image_size=(192, 256), text_len=12):
    model = PixelBert(cfg).eval()  # eval: no random sampling, so the sequence length is fixed
    return measure_flops(model, synthetic_batch(cfg.vocab_size, batch_size, image_size, text_len))


def test_flops_are_per_sample_and_backward_costs_more_than_forward(tiny_cfg):
    two, four = _eval_flops(tiny_cfg.model, 2), _eval_flops(tiny_cfg.model, 4)
    assert two.forward > 0 and two.backward > two.forward
    assert abs(two.training - four.training) / two.training < 0.01
    assert two.training == two.forward + two.backward


def test_counted_transformer_layer_matches_its_matmuls(tiny_cfg):
    # Two more layers add exactly their projections and attention products.
    cfg = tiny_cfg.model
    text_len, (height, width) = 12, (192, 256)
    seq = text_len + (height // 64) * (width // 64)
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h
    base = _eval_flops(cfg, 2, (height, width), text_len).forward
    deeper = _eval_flops(dataclasses.replace(cfg, num_layers=cfg.num_layers + 2), 2, (height, width),
                         text_len).forward
    assert deeper - base == 2 * per_layer


def test_pixel_sampling_lowers_training_flops(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.model, pixel_sample_count=4)
    batch = synthetic_batch(cfg.vocab_size, 2, (512, 512), 12)
    model = PixelBert(cfg)
    sampled = measure_flops(model.train(), batch)
    full = measure_flops(model.eval(), batch)
    assert sampled.forward < full.forward
