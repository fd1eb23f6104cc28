"""The synthetic shapes source and source readers that need no Ray."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline.sources import SourceError, SourceSpec, read_records
from data_pipeline.synthetic import COLORS, generate
from tests import sample_inputs as inputs


def test_synthetic_is_seeded_coco_with_varied_sizes(tmp_path):
    a = generate(tmp_path / "a", 30, seed=4)
    b = generate(tmp_path / "b", 30, seed=4)
    c = generate(tmp_path / "c", 30, seed=5)
    data_a = json.loads(a.read_text())
    assert data_a["images"] == json.loads(b.read_text())["images"]
    assert (tmp_path / "a/images/000000000007.jpg").read_bytes() == (tmp_path / "b/images/000000000007.jpg").read_bytes()
    assert data_a["annotations"] != json.loads(c.read_text())["annotations"]
    assert len(data_a["annotations"]) == 5 * 30
    ratios = {round(i["width"] / i["height"], 1) for i in data_a["images"]}
    assert len(ratios) > 8 and min(ratios) < 0.8 and max(ratios) > 1.25


def test_synthetic_captions_name_exactly_the_colours_in_their_image(tmp_path):
    path = generate(tmp_path, 40, seed=0)
    data = json.loads(path.read_text())
    first_caption = {a["image_id"]: a["caption"] for a in reversed(data["annotations"])}
    distinct = set(first_caption.values())
    assert len(distinct) > 30  # captions rarely repeat, so a random other caption rarely fits
    for image in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / image["file_name"])).reshape(-1, 3).astype(int)
        caption = first_caption[image["id"]]
        for name, rgb in COLORS.items():
            present = (np.abs(pixels - np.array(rgb)).sum(axis=1) < 60).sum() > 50
            assert present == (name in caption.split()), (image["file_name"], caption, name)


def test_img2dataset_files_format_and_spec_errors(tmp_path):
    root = inputs.write_img2dataset_files(tmp_path / "i2d", {"000000001": inputs.jpeg(), "000000002": inputs.jpeg()})
    records = list(read_records(SourceSpec.parse(f"img2dataset:path={root}")))
    assert [(r.key, r.captions) for r in records] == [("img2dataset_000000001", ("file caption 000000001",)),
                                                      ("img2dataset_000000002", ("file caption 000000002",))]
    with pytest.raises(SourceError, match="kind must be one of coco, vg, manifest, img2dataset"):
        SourceSpec.parse("laion:path=x")
    with pytest.raises(SourceError, match="source coco: missing option\\(s\\) images"):
        list(read_records(SourceSpec.parse("coco:captions=x.json")))
    with pytest.raises(SourceError, match="manifest .*pairs.txt: unknown format '.txt'"):
        (tmp_path / "pairs.txt").write_text("x")
        list(read_records(SourceSpec.parse(f"manifest:path={tmp_path / 'pairs.txt'}")))


def test_manifest_without_the_image_column_names_it(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"url": "a.jpg", "caption": "x"}) + "\n")
    with pytest.raises(SourceError, match="row 0 has no column 'image' \\(columns: url, caption\\); set image_column="):
        list(read_records(SourceSpec.parse(f"manifest:path={tmp_path / 'm.jsonl'}")))


def test_s3_storage_round_trip_with_multipart_and_ranges(tmp_path, bucket, monkeypatch):
    from data_pipeline.storage import s3 as storage_module
    from data_pipeline.storage import StorageError, open_storage, read_uri, sha256_of

    monkeypatch.setattr(storage_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part
    store = open_storage(f"s3://{bucket}/prefix")
    store.check_writable()
    big = tmp_path / "big.bin"
    payload = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MB: three parts
    big.write_bytes(payload)
    store.upload_file("big.tar", str(big))
    assert store.size("big.tar") == len(payload)
    with store.open_read("big.tar") as stream:
        digest, size = sha256_of(stream)
    assert size == len(payload) and digest == __import__("hashlib").sha256(payload).hexdigest()
    assert store.read_bytes("big.tar", (1000, 10)) == payload[1000:1010]
    assert read_uri(f"s3://{bucket}/prefix/big.tar", (5, 3)) == payload[5:8]
    assert store.list() == ["big.tar"]
    with pytest.raises(StorageError, match="does not exist"):
        store.read_bytes("absent.tar")
    with pytest.raises(StorageError, match="bucket 'absent-bucket-1' does not exist"):
        open_storage("s3://absent-bucket-1/x").check_writable()
