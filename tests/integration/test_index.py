"""Indexing existing WebDataset tars in place: manifest + DALI index, bad input, S3, resume, training reads."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline import index, upgrade, verify
from data_pipeline.dataset_manifest import read_table
from data_pipeline.shard_format import FORMAT, MANIFEST
from data_pipeline.storage import open_storage, s3_client
from data_pipeline.synthetic import generate
from pixelbert_dist.config import load_config
from pixelbert_dist.data.loader import StreamingLoader
from pixelbert_dist.data.plan import Manifest
from pixelbert_dist.tokenizer import train_wordpiece
from tests.conftest import TINY
from tests.datasets import as_v1, shift_table_row

PER_TAR = 8


def _images(root: Path, count: int) -> list[tuple[bytes, str]]:
    captions = generate(root / "syn", count, seed=3, min_side=96, max_side=160)
    data = json.loads(captions.read_text())
    first = {}
    for a in data["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    return [((root / "syn" / "images" / i["file_name"]).read_bytes(), first[i["id"]]) for i in data["images"]]


def _as(fmt: str, jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_img2dataset(folder: Path, pairs: list[tuple[bytes, str]]) -> dict[str, str]:
    """img2dataset's output: 00000.tar ... via webdataset's TarWriter, keys 000000000...; tar 1 in png/webp."""
    folder.mkdir(parents=True)
    good = {}
    for t in range(0, len(pairs), PER_TAR):
        with wds.TarWriter(str(folder / f"{t // PER_TAR:05d}.tar")) as sink:
            for i, (jpeg, caption) in enumerate(pairs[t:t + PER_TAR], start=t):
                key = f"{i:09d}"
                ext, image = ("jpg", jpeg) if t // PER_TAR != 1 else (("png", "webp")[i % 2], None)
                image = image or _as(ext.upper(), jpeg)
                sample = {"__key__": key, ext: image, "json": {"key": key, "status": "success", "caption": caption}}
                if i % 5 != 4:  # some samples carry their caption only in the json, as OpenCLIP's tools may
                    sample["txt"] = caption
                sink.write(sample)
                good[key] = caption
        (folder / f"{t // PER_TAR:05d}_stats.json").write_text("{}")  # img2dataset's own file: left alone
    return good


def _member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (0 if kind != tarfile.REGTYPE else len(data)), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_bad(folder: Path, pairs: list[tuple[bytes, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """bad.tar: good samples around every kind of bad one; cut.tar: a tar cut inside its 4th sample."""
    (jpeg, caption), (jpeg2, caption2) = pairs[:2]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _member(tar, "good1.jpg", jpeg)
        _member(tar, "good1.txt", caption.encode())
        _member(tar, "../escape.jpg", jpeg)
        _member(tar, "../escape.txt", b"a caption that must never be trained on")
        _member(tar, "/abs/path.jpg", jpeg)
        _member(tar, "/abs/path.txt", b"absolute")
        _member(tar, "link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
        _member(tar, "link.txt", b"a link")
        _member(tar, "nocap.jpg", jpeg)
        _member(tar, "nocap.json", b'{"status": "success"}')
        _member(tar, "latin1.jpg", jpeg)
        _member(tar, "latin1.txt", "caf\u00e9 au lait".encode("latin-1"))
        _member(tar, "garbage.jpg", b"\xff\xd8 not a jpeg at all")
        _member(tar, "garbage.txt", b"garbage")
        _member(tar, "good2.jpg", jpeg2)
        _member(tar, "good2.txt", caption2.encode())
    (folder / "bad.tar").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (image, text) in enumerate(pairs[3:7]):
            _member(tar, f"cut{i}.jpg", image)
            _member(tar, f"cut{i}.txt", text.encode())
        offset_of_last = tar.offset
    (folder / "cut.tar").write_bytes(buffer.getvalue()[:offset_of_last - 1024 - 100])  # ...cut3.jpg's end
    good = {"good1": caption, "good2": caption2, **{f"cut{i}": t for i, (_, t) in enumerate(pairs[3:6])}}
    expected = {"../escape": "unsafe_member", "/abs/path": "unsafe_member", "link": "unsafe_member",
                "nocap": "empty_caption", "latin1": "non_utf8_caption", "garbage": "corrupt_image",
                "cut3": "truncated_tar"}
    return good, expected


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("index")
    pairs = _images(root, 3 * PER_TAR + 7)
    good = _write_img2dataset(root / "img2dataset", pairs[:3 * PER_TAR])
    (root / "bad").mkdir()
    bad_good, bad_expected = _write_bad(root / "bad", pairs[3 * PER_TAR:])
    vocab = train_wordpiece([c for _, c in pairs] * 3, 150, root / "vocab")
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=64", "--data.image_long_side=128"])
    return {"root": root, "good": good, "bad_good": bad_good, "bad_expected": bad_expected, "cfg": cfg}


def _epoch_pairs(url: str, cfg, workers: int = 1) -> list[tuple[str, str]]:
    """(key, caption) of every pair one rank's epoch yields, with batch 1 so none is dropped."""
    loader = StreamingLoader(url, cfg.data, 1, num_workers=workers, seed=1)
    loader.manifest.check_shards_present()
    manifest = loader.manifest
    out = []
    for _, info in loader.epoch_batches():
        for (shard, pair), key in zip(info.pairs, info.keys):
            out.append((key, shard, pair))
    assert loader.state_dict()["skipped"] == 0
    captions = {}
    from pixelbert_dist.data.stream import read_segment
    from pixelbert_dist.data.plan import Segment
    for shard in manifest.shard_names():
        for p in read_segment(manifest, Segment(shard, 0, manifest.num_pairs(shard))):
            captions[p.key] = p.caption
    return [(key, captions[key]) for key, _, _ in out]


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_indexed_in_place_the_loader_yields_every_pair_once_and_the_tars_are_untouched(data):
    folder = data["root"] / "img2dataset"
    before = _files(folder)
    assert index.main([str(folder), "--no-progress"]) == 0
    after = _files(folder)
    assert {n: h for n, h in after.items() if n in before} == before  # tars and img2dataset's files unchanged
    assert sorted(set(after) - set(before)) == sorted(
        [MANIFEST] + [f"0000{i}{suffix}" for i in range(3) for suffix in (".idx", ".samples.npy", "_index.json")])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["num_samples"] == len(data["good"]) and manifest["stats"]["skipped"] == {}
    assert all("url" not in s and s["layout"] == "img2dataset" and "samples" not in s for s in manifest["shards"])
    # the DALI index lists every member where it is
    idx = (folder / "00000.idx").read_text().splitlines()
    assert idx[0] == f"v1.2 {PER_TAR}" and idx[1].startswith("jpg ") and "000000000.txt" in idx[1]
    jpg_offset, jpg_size = map(int, idx[1].split()[1:3])
    tar_bytes = (folder / "00000.tar").read_bytes()
    Image.open(io.BytesIO(tar_bytes[jpg_offset:jpg_offset + jpg_size])).load()

    seen = _epoch_pairs(str(folder), data["cfg"])
    assert sorted(seen) == sorted(data["good"].items())  # every pair once, captions from .txt or .json


def test_on_s3_with_the_manifest_elsewhere_and_a_brace_pattern(data, bucket):
    client = s3_client()
    folder = data["root"] / "img2dataset"
    for tar in sorted(folder.glob("0000?.tar")):
        client.upload_file(str(tar), bucket, f"laion/{tar.name}")
    raw_before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="laion/")["Contents"]}
    # 00003.tar is absent (a failed img2dataset shard): counted as missing, not an error
    assert index.main([f"s3://{bucket}/laion/{{00000..00003}}.tar", "--out", f"s3://{bucket}/index",
                       "--no-progress"]) == 0
    raw_after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=bucket, Prefix="laion/")["Contents"]}
    assert raw_after == raw_before  # nothing written beside the tars
    manifest = Manifest(f"s3://{bucket}/index")
    assert [s["url"] for s in manifest.shards.values()] == [f"s3://{bucket}/laion/0000{i}.tar" for i in range(3)]
    stats = json.loads(client.get_object(Bucket=bucket, Key="index/manifest.json")["Body"].read())["stats"]
    assert stats["missing_tars"] == [f"s3://{bucket}/laion/00003.tar"]
    assert sorted(_epoch_pairs(f"s3://{bucket}/index", data["cfg"])) == sorted(data["good"].items())


def test_bad_samples_are_counted_named_and_never_trained_on(data, tmp_path):
    folder = data["root"] / "bad"
    before = _files(data["root"])
    out = tmp_path / "out"
    assert index.main([str(folder), "--out", str(out), "--no-progress"]) == 0
    assert _files(data["root"]) == before  # nothing written beside the tars or anywhere else...
    assert sorted(_files(out)) == sorted([MANIFEST] + [f"{name}{suffix}" for name in ("bad", "cut")
                                                       for suffix in (".idx", ".samples.npy", "_index.json")])
    assert not (tmp_path / "escape.jpg").exists() and not (data["root"] / "escape.jpg").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    # every skipped sample named in its tar's result; the manifest holds counts and a few examples
    named = {s["key"]: s["reason"] for name in ("bad", "cut")
             for s in json.loads((out / f"{name}_index.json").read_text())["skipped"]}
    assert named == data["bad_expected"]
    assert sum(sum(s["skipped_counts"].values()) for s in manifest["shards"]) == len(named)
    counts = {}
    for reason in data["bad_expected"].values():
        counts[reason] = counts.get(reason, 0) + 1
    assert manifest["stats"]["skipped"] == counts
    assert manifest["stats"]["truncated_tars"] == ["cut.tar"]
    assert {e["shard"] for e in manifest["stats"]["skipped_examples"]} == {"bad.tar", "cut.tar"}
    assert all(s["url"].startswith(str(folder)) for s in manifest["shards"])
    assert sorted(_epoch_pairs(str(out), data["cfg"], workers=0)) == sorted(data["bad_good"].items())


def test_a_rerun_reads_no_tar_again_and_a_changed_tar_is_read_anew(data, tmp_path):
    folder = data["root"] / "img2dataset"
    out = tmp_path / "resume"
    assert index.main([f"{folder}/{{00000..00002}}.tar", "--out", str(out), "--no-progress"]) == 0
    first = json.loads((out / MANIFEST).read_text())
    results = {p.name: p.stat().st_mtime_ns for p in out.glob("*_index.json")}
    assert first["stats"]["tars_read"] == 3
    assert index.main([f"{folder}/{{00000..00002}}.tar", "--out", str(out), "--no-progress"]) == 0
    second = json.loads((out / MANIFEST).read_text())
    assert (second["stats"]["tars_read"], second["stats"]["tars_reused"]) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_index.json")} == results
    assert second["shards"] == first["shards"]
    # a result an earlier version wrote (its samples listed, no table) is completed, the tar not read again
    table = out / "00001.samples.npy"
    written = table.read_bytes()
    result = json.loads((out / "00001_index.json").read_text())
    shard = next(s for s in first["shards"] if s["name"] == "00001.tar")
    result["samples"] = list(read_table(open_storage(str(out)), str(out), shard).entries())
    for key in ("num_captions", "table_bytes", "table_sha256"):
        del result[key]
    (out / "00001_index.json").write_text(json.dumps(result))
    table.unlink()
    assert index.main([f"{folder}/{{00000..00002}}.tar", "--out", str(out), "--no-progress"]) == 0
    third = json.loads((out / MANIFEST).read_text())
    assert (third["stats"]["tars_read"], third["shards"], table.read_bytes()) == (0, first["shards"], written)
    assert "samples" not in json.loads((out / "00001_index.json").read_text())
    # a tar replaced by a different one (another size) is indexed again, alone
    copy = tmp_path / "copy"
    copy.mkdir()
    for tar in folder.glob("0000?.tar"):
        (copy / tar.name).write_bytes(tar.read_bytes())
    assert index.main([str(copy), "--out", str(out), "--no-progress"]) == 0  # other URLs: all read
    assert json.loads((out / MANIFEST).read_text())["stats"]["tars_read"] == 3
    data_1 = (copy / "00001.tar").read_bytes()
    (copy / "00001.tar").write_bytes(data_1 + b"\0" * 10240)
    assert index.main([str(copy), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / MANIFEST).read_text())["stats"]["tars_read"] == 1


def test_a_dataset_the_sharding_job_wrote_is_not_overwritten(tmp_path, data):
    out = tmp_path / "sharded"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "shards": []}))
    assert index.main([str(data["root"] / "img2dataset"), "--out", str(out), "--no-progress"]) == 2
    assert json.loads((out / MANIFEST).read_text())["format"] == FORMAT


def test_verify_reads_an_index_with_its_tars_elsewhere_and_names_a_damaged_table(data, tmp_path, capsys):
    folder, out = data["root"] / "img2dataset", tmp_path / "index"
    assert index.main([str(folder), "--out", str(out), "--no-progress"]) == 0
    assert all(s["url"].startswith(f"{folder}/") for s in json.loads((out / MANIFEST).read_text())["shards"])
    assert verify.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "skipped at indexing: none" in printed
    # sample #3 of 00001.tar moved back into #2; the manifest's table sha256 updated, so only the rows show it
    key = shift_table_row(open_storage(str(out)), 1, 3, -512)
    assert verify.main([str(out)]) == 1
    printed = capsys.readouterr().out
    [damaged] = [line for line in printed.splitlines() if "MISMATCH" in line]
    assert "shard '00001.tar'" in damaged and f"sample {key!r}" in damaged and "row 3" in damaged, printed


def test_a_compressed_tar_is_counted_and_named_with_why_and_what_to_do(data, tmp_path, caplog):
    import gzip
    folder, out = tmp_path / "mixed", tmp_path / "index"
    folder.mkdir()
    raw = (data["root"] / "img2dataset" / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(raw)
    (folder / "00001.tar.gz").write_bytes(gzip.compress(raw))
    (folder / "00002.tgz").write_bytes(gzip.compress(raw))
    assert index.main([str(folder), "--out", str(out), "--no-progress"]) == 0
    compressed = json.loads((out / MANIFEST).read_text())["stats"]["compressed_tars"]
    assert compressed["count"] == 2 and compressed["tars"] == [f"{folder}/00001.tar.gz", f"{folder}/00002.tgz"]
    assert "byte offset" in compressed["why"] and "decompress" in compressed["what_to_do"]
    assert "data_pipeline.shard" in compressed["what_to_do"]
    summary = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "WARNING" and "2 compressed tar(s) not indexed" in summary
    assert f"{folder}/00001.tar.gz" in summary and "byte offset" in summary and "decompress" in summary
    # only compressed tars: refused before anything is read or written, named the same way
    (folder / "00000.tar").unlink()
    caplog.clear()
    assert index.main([str(folder), "--out", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "no .tar files to index: 2 compressed tar(s)" in caplog.text and "decompress" in caplog.text
    assert not (tmp_path / "none" / MANIFEST).exists()


def test_a_v1_index_on_s3_is_upgraded_in_place_and_its_tars_are_untouched(data, bucket, capsys):
    client = s3_client()
    for tar in sorted((data["root"] / "img2dataset").glob("0000?.tar")):
        client.upload_file(str(tar), bucket, f"laion/{tar.name}")
    url = f"s3://{bucket}/index"
    assert index.main([f"s3://{bucket}/laion", "--out", url, "--no-progress"]) == 0
    v2 = as_v1(open_storage(url))
    tars = {o["Key"]: (o["ETag"], o["LastModified"]) for o in client.list_objects_v2(
        Bucket=bucket, Prefix="laion/")["Contents"]}
    assert verify.main([url]) == 0  # v1 still reads
    assert upgrade.main([url]) == 0 and "upgraded from pixelbert-dist/webdataset-index-v1" in capsys.readouterr().out
    upgraded = json.loads(client.get_object(Bucket=bucket, Key=f"index/{MANIFEST}")["Body"].read())
    assert upgraded["shards"] == v2["shards"] and upgraded["format"] == v2["format"]  # urls, counts, tables
    assert verify.main([url]) == 0
    assert upgrade.main([url]) == 0 and "already" in capsys.readouterr().out
    assert {o["Key"]: (o["ETag"], o["LastModified"]) for o in client.list_objects_v2(
        Bucket=bucket, Prefix="laion/")["Contents"]} == tars


def test_expanding_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/00000.tar", "a/00001.tar", "a/00000_stats.json", "a/00003.tar.gz", "a/00004.tgz"):
        (tmp_path / name).write_bytes(b"")
    tars, compressed = index.expand_inputs([str(tmp_path / "a"), f"{tmp_path}/a/{{00001..00002}}.tar"])
    assert tars == [f"{tmp_path}/a/00000.tar", f"{tmp_path}/a/00001.tar", f"{tmp_path}/a/00002.tar"]
    assert compressed == [f"{tmp_path}/a/00003.tar.gz", f"{tmp_path}/a/00004.tgz"]
    assert index.common_folder(tars) == f"{tmp_path}/a"
    assert index.common_folder(["s3://b/x/1/0.tar", "s3://b/x/2/0.tar"]) == "s3://b/x"
    with pytest.raises(Exception, match="share no folder"):
        index.common_folder(["s3://b/0.tar", "s3://c/0.tar"])


@pytest.mark.parametrize("cut", [-1024 - 100, -700, -1024, 0])
def test_a_tar_cut_anywhere_in_its_last_sample_loses_that_sample_only(data, cut):
    from data_pipeline.tar_index import index_stream
    pairs = _images(data["root"] / f"cut{cut}", 3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (image, text) in enumerate(pairs):
            _member(tar, f"s{i}.jpg", image)
            _member(tar, f"s{i}.txt", text.encode())
        end = tar.offset
    whole = buffer.getvalue()
    # cut inside the last image, inside the last header, at the last member's start, just before the end blocks
    result = index_stream(io.BytesIO(whole[:end + cut]), 10**8)
    assert [s["key"] for s in result.samples] == ["s0", "s1"]
    assert [(s["key"], s["reason"]) for s in result.skipped] == [("s2", "truncated_tar")] and result.truncated
    assert result.sha256 == hashlib.sha256(whole[:end + cut]).hexdigest()
    complete = index_stream(io.BytesIO(whole), 10**8)
    assert len(complete.samples) == 3 and not complete.skipped and not complete.truncated


def test_a_key_longer_than_a_sample_table_holds_is_skipped_by_name(data):
    from data_pipeline.sample_table import MAX_KEY_BYTES
    from data_pipeline.tar_index import index_stream
    (jpeg, caption), = _images(data["root"] / "long-key", 1)
    long_key = "k" * (MAX_KEY_BYTES + 1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:  # pax: names past 100 bytes
        for key in ("short", long_key):
            _member(tar, f"{key}.jpg", jpeg)
            _member(tar, f"{key}.txt", caption.encode())
    result = index_stream(io.BytesIO(buffer.getvalue()), 10**8)
    assert [s["key"] for s in result.samples] == ["short"]
    assert [(s["key"], s["reason"]) for s in result.skipped] == [(long_key, "long_key")]


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "pairs" / "rank0.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows]


@pytest.mark.slow
def test_indexed_tars_give_the_trainer_the_resharded_datasets_batches(data, tmp_path):
    """The same pairs in the same tars, once written by the sharding job and once by
    img2dataset's naming then indexed in place: the trainer's loader must hand it identical
    batches (the trainer itself is the same code either way)."""
    from data_pipeline import shard
    from data_pipeline.shard_format import read_samples
    tars = data["root"] / "img2dataset"
    assert shard.main(["--source", f"img2dataset:path={tars}", "--out", str(tmp_path / "resharded"),
                       "--shard-size", str(PER_TAR), "--max-short-side", "0", "--max-long-side", "0",
                       "--no-progress"]) == 0
    # the sharding job's shards, sample for sample, as an img2dataset user would hold them
    mirror = tmp_path / "img2dataset-order"
    mirror.mkdir()
    for path in sorted((tmp_path / "resharded").glob("*.tar")):
        with path.open("rb") as stream, wds.TarWriter(str(mirror / path.name)) as sink:
            for entry, members in read_samples(stream):
                [caption] = json.loads(members["json"])["captions"]
                image_ext = next(ext for ext in members if ext != "json")
                sink.write({"__key__": entry.key, image_ext: members[image_ext], "txt": caption})
    assert index.main([str(mirror), "--out", str(tmp_path / "indexed"), "--no-progress"]) == 0

    def epoch(name: str) -> list[tuple[list, dict]]:  # what the trainer's loader hands it
        from pixelbert_dist.data.loader import StreamingLoader
        loader = StreamingLoader(str(tmp_path / name), data["cfg"].data, 4, num_workers=0, seed=1)
        return [(info.pairs, vars(batch)) for batch, info in loader.epoch_batches()]

    resharded, indexed = epoch("resharded"), epoch("indexed")
    assert len(indexed) >= 4 and [pairs for pairs, _ in indexed] == [pairs for pairs, _ in resharded]
    for (_, ours), (_, theirs) in zip(indexed, resharded):  # pixels, masks, tokens and labels to the bit
        assert ours.keys() == theirs.keys() and all(
            (ours[k] is None and theirs[k] is None) or torch.equal(ours[k], theirs[k]) for k in ours), ours.keys()
