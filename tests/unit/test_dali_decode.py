"""The DALI image path against the CPU path it replaces (DALI's CPU operators; no GPU needed)."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from pixelbert_dist.data.batch import decode_resize  # noqa: E402
from pixelbert_dist.data.dali_decode import DaliImageDecoder, build_pipeline, resolve_decoder  # noqa: E402
from pixelbert_dist.model import pad_images  # noqa: E402

SHORT, LONG = 224, 384
# (width, height): landscape and portrait COCO sizes, a small image that is scaled up, one whose
# long side hits the cap, a square one, one taller than the cap allows, a large one (8x downscale)
SIZES = [(640, 480), (480, 640), (100, 60), (1000, 200), (612, 612), (300, 900), (2000, 1500)]


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """Smooth colour fields plus grain: compresses and resamples like a photo, unlike noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs():
    return [photo_jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def decoder():
    return DaliImageDecoder(SHORT, LONG, max_batch_size=len(SIZES) + 2, device_id=None, num_threads=1)


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of uint8 images in 0..255 grey levels."""
    return (a.int() - b.int()).abs().float()


def test_dali_cpu_matches_pil_path_sizes_masks_and_pixels(jpegs, decoder):
    reference, reference_mask = pad_images([decode_resize(j, SHORT, LONG) for j in jpegs])
    images, mask, kept = decoder(jpegs)
    assert kept == list(range(len(jpegs)))
    assert images.dtype == reference.dtype == torch.uint8 and mask.dtype == torch.bool
    assert images.shape == reference.shape
    assert torch.equal(mask, reference_mask)
    assert torch.all(images.permute(1, 0, 2, 3)[:, ~mask] == 0)  # zero padding, as pad_images
    diff = grey_levels(images, reference).permute(1, 0, 2, 3)[:, mask]
    # Measured (DALI 2.4, Pillow 13): max 9 levels, mean 0.2-1.2 per image at 224/384, where PIL
    # decodes 2x+ downscales at reduced DCT scale first; max 2, mean 0.2 at 800/1333 (upscaling).
    # A wrong channel order, size or filter family gives tens of levels.
    assert diff.max() <= 16
    assert diff.mean() <= 2.0


def test_corrupt_images_are_dropped_and_the_rest_keep_their_order(jpegs, decoder):
    truncated = jpegs[0][: len(jpegs[0]) // 2]  # header intact: only the decoder finds out
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    good = [jpegs[1], jpegs[3], jpegs[4]]
    batch = [good[0], truncated, good[1], garbage, good[2]]
    before = decoder.skipped
    images, mask, kept = decoder(batch)
    assert kept == [0, 2, 4]
    assert decoder.skipped - before == 2
    clean, clean_mask, _ = decoder(good)  # the decoder still works, and agrees with itself
    assert torch.equal(images, clean) and torch.equal(mask, clean_mask)
    reference = pad_images([decode_resize(j, SHORT, LONG) for j in good])[0]
    assert grey_levels(images, reference).max() <= 16


def test_a_batch_with_nothing_decodable_is_empty(decoder):
    images, mask, kept = decoder([b"not an image"])
    assert kept == [] and images.shape[0] == 0 and mask.shape[0] == 0


def test_auto_picks_cpu_without_a_gpu_and_says_why(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with caplog.at_level(logging.INFO, logger="pixelbert_dist.data.dali_decode"):
        assert resolve_decoder("auto") == "cpu"
    assert "no CUDA GPU" in caplog.text
    assert resolve_decoder("cpu") == "cpu"
    assert resolve_decoder("dali") == "dali"  # DALI's CPU operators, on request
    with pytest.raises(ValueError, match="cpu, dali or auto"):
        resolve_decoder("gpu")


def test_gpu_pipeline_definition_checks_operator_arguments_and_devices():
    # Defining the graph validates every argument name against the operator's schema and each
    # input's device (a CPU op fed GPU data raises); only build() needs a GPU. So this catches
    # a typo in the mixed-only decoder arguments without running anything.
    pipe = build_pipeline(max_batch_size=4, device_id=0, num_threads=1)
    assert pipe.device_id == 0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            pipe.build()


# ---------------------------------------------------------------------------- augmentation, both paths

from pixelbert_dist.config import DataConfig  # noqa: E402
from pixelbert_dist.data.augment import Augmenter, Draw, apply  # noqa: E402
from pixelbert_dist.data.dali_decode import GraphAugment  # noqa: E402

EVERY_STAGE = GraphAugment(flip=True, colour=True, randaugment=True)
# one op at a time at RandAugment magnitude 9 (torchvision's scale), then all of them at once
ONE_OP = {"none": Draw(SHORT), "flip": Draw(SHORT, flip=True), "rotate": Draw(SHORT, angle=-9.0),
          "shear+translate": Draw(SHORT, shear=(0.09, -0.09), translate=(0.14, -0.1)),
          "brightness": Draw(SHORT, brightness=1.27), "contrast": Draw(SHORT, contrast=0.73),
          "saturation": Draw(SHORT, saturation=1.27), "sharpness": Draw(SHORT, sharpness=0.73),
          "posterize": Draw(SHORT, posterize=6), "autocontrast": Draw(SHORT, autocontrast=True),
          "equalize": Draw(SHORT, equalize=True)}
ALL_OPS = Draw(SHORT, flip=True, angle=9.0, shear=(0.05, 0.0), translate=(0.0, 0.1), brightness=0.8, contrast=1.2,
               saturation=0.8, sharpness=1.3, posterize=6, autocontrast=True, equalize=True)


@pytest.fixture(scope="module")
def augmenting_decoder():
    return DaliImageDecoder(SHORT, LONG, max_batch_size=len(ONE_OP) + 1, device_id=None, num_threads=1,
                            augment=EVERY_STAGE)


def test_dali_augments_as_the_cpu_path_does_op_by_op(augmenting_decoder):
    # Images already at their target size: PIL and DALI decode them to the same pixels and the
    # resize is an identity, so what differs is the augmentation alone. One image per case.
    cases = [*ONE_OP.items(), ("all", ALL_OPS)]
    shapes = [(320, 224), (224, 300), (224, 224), (384, 224)]
    jpegs = [photo_jpeg(*shapes[i % len(shapes)], seed=i) for i in range(len(cases))]
    decoded = [decode_resize(j, SHORT, LONG) for j in jpegs]
    reference, reference_mask = pad_images([apply(image, draw) for image, (_, draw) in zip(decoded, cases)])
    images, mask, kept = augmenting_decoder(jpegs, [draw for _, draw in cases])
    assert kept == list(range(len(cases))) and torch.equal(mask, reference_mask)
    for i, (name, draw) in enumerate(cases):
        diff = grey_levels(images[i], reference[i])[:, mask[i]]
        # Measured (DALI 2.4, torch 2.14): 0 levels for flip, contrast, sharpness, posterize,
        # autocontrast, equalize; at most 1 level on under 1% of pixels for the warps, brightness,
        # saturation (float rounding at .5). All stages at once: the LUT stages (autocontrast,
        # equalize) turn a 1-level difference into up to 8, on 0.04% of pixels.
        if name == "all":
            assert (diff > 1).float().mean() < 0.002, name
        else:
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, (name, diff.max())
    # a warp the other way round is far off: the check can fail
    rotated = list(ONE_OP).index("rotate")
    other_way = apply(decoded[rotated], Draw(SHORT, angle=9.0))
    height, width = other_way.shape[-2:]
    assert grey_levels(images[rotated, :, :height, :width], other_way).mean() > 5


def test_dali_and_cpu_paths_agree_on_drawn_multiscale_batches(jpegs, augmenting_decoder):
    cfg = DataConfig(image_short_side=SHORT, image_long_side=LONG, augment_short_sides=[160, 192, 224, 256],
                     augment_flip=0.5, augment_color_jitter=0.4, augment_randaugment=2)
    draws = [Augmenter(cfg, seed=3, epoch=1).draw("000000.tar", f"key{i}") for i in range(len(jpegs))]
    assert len({d.short_side for d in draws}) > 1 and any(d.flip for d in draws)
    reference, reference_mask = pad_images([apply(decode_resize(j, d.short_side, LONG), d)
                                            for j, d in zip(jpegs, draws)])
    images, mask, kept = augmenting_decoder(jpegs, draws)
    assert kept == list(range(len(jpegs)))
    assert images.shape == reference.shape and torch.equal(mask, reference_mask)  # the same geometry
    diff = grey_levels(images, reference).permute(1, 0, 2, 3)[:, mask]
    # Measured: max 10, mean 0.7 levels: the plain decode's resampling gap (above), nothing added
    assert diff.max() <= 16
    assert diff.mean() <= 2.0


def test_a_graph_without_augmentation_is_the_plain_one():
    # off, the graph takes no augmentation inputs: nothing to feed, nothing run
    assert GraphAugment.of(DataConfig()) == GraphAugment()
    assert GraphAugment().inputs([None], [(64, 64)]) == {}
    assert GraphAugment.of(DataConfig(augment_randaugment=2)).inputs([Draw(64)], [(64, 96)]).keys() == {
        "matrix", "tones", "factors"}


def test_gpu_augmenting_pipeline_definition_checks_operator_arguments_and_devices():
    # every stage on the GPU graph: argument names, argument inputs (CPU) and data devices are
    # checked when the graph is defined; only build() needs the GPU
    pipe = build_pipeline(max_batch_size=4, device_id=0, num_threads=1, augment=EVERY_STAGE)
    assert pipe.device_id == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_gpu_path_augments_as_the_cpu_path(jpegs):
    gpu = DaliImageDecoder(SHORT, LONG, max_batch_size=len(SIZES), device_id=0, num_threads=1, augment=EVERY_STAGE)
    draws = [ALL_OPS if i % 2 else ONE_OP["rotate"] for i in range(len(jpegs))]
    reference, reference_mask = pad_images([apply(decode_resize(j, SHORT, LONG), d) for j, d in zip(jpegs, draws)])
    images, mask, kept = gpu(jpegs, draws)
    assert images.is_cuda and kept == list(range(len(jpegs)))
    assert torch.equal(mask.cpu(), reference_mask)
    diff = grey_levels(images.cpu(), reference).permute(1, 0, 2, 3)[:, mask.cpu()]
    assert diff.mean() <= 2.0


def test_the_gpu_paths_batch_keeps_the_workers_skip_reasons_when_an_image_fails(jpegs):
    # The loader counts skips by reason from BatchInfo.skips (damage found while reading the
    # shard) and puts whatever else was skipped under corrupt_image (DALI's own failures): a
    # rebuilt BatchInfo without the worker's skips filed bad_tar pairs under corrupt_image.
    from pixelbert_dist.config import DataConfig
    from pixelbert_dist.data.decode import DaliDecoder
    from pixelbert_dist.data.types import BatchInfo, PretrainBatch, Skipped

    ids = torch.arange(12).view(3, 4)
    batch = PretrainBatch(None, None, ids, torch.ones_like(ids), ids, torch.tensor([1, 0, 1]), torch.arange(3))
    worker_skip = Skipped("000001.tar", "bad_tar", 2, "000001.tar: sample 7 at offset 5120: bad header checksum")
    info = BatchInfo(["a", "b", "c"], [("000000.tar", 0), ("000000.tar", 1), ("000000.tar", 2)],
                     {"000000.tar": [[0, 3]], "000001.tar": [[0, 2]]}, skipped=2, truncated=0,
                     jpegs=[(jpegs[0], None), (b"not a jpeg", None), (jpegs[2], None)], skips=[worker_skip])
    decoded, info = DaliDecoder(DataConfig(image_short_side=SHORT, image_long_side=LONG), 3).finish(batch, info)
    assert info.pairs == [("000000.tar", 0), ("000000.tar", 2)] and decoded.input_ids.tolist() == [ids[0].tolist(),
                                                                                                 ids[2].tolist()]
    assert info.skipped == 3 and info.skips == [worker_skip]  # the failed image on top, the reasons kept
