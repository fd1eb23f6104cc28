"""The sharding job on a real local Ray cluster, writing to disk and to moto's S3 server.

Over 300 lines: one fixture (a sharded dataset on disk and on S3) serves every test here.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import shard, upgrade, verify
from data_pipeline.dataset_manifest import read_table
from data_pipeline.images import ImageSettings
from data_pipeline.sample_table import table_name
from data_pipeline.shard_format import MANIFEST, is_job_file
from data_pipeline.storage import open_storage, s3_client
from data_pipeline.sources import SourceSpec
from data_pipeline.synthetic import generate
from tests import sample_inputs as inputs
from tests.datasets import as_v1, shift_table_row

REPO = Path(__file__).resolve().parents[2]


def _run(argv) -> int:
    return shard.main([*argv, "--no-progress"])


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _samples(folder: Path, entry: dict) -> list[dict]:
    """A shard's samples (key, offset, size, captions) from its table, checked as the loader reads it."""
    return list(read_table(open_storage(str(folder)), str(folder), entry).entries())


def _read_back(folder: Path) -> dict[str, dict]:
    """Every sample through webdataset's own reader (no decoding: raw bytes only)."""
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)}


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory):
    """Four source formats, 8 images each, plus include/exclude lists."""
    root = tmp_path_factory.mktemp("sources")
    coco = inputs.write_coco(root / "coco", {i: inputs.jpeg(120 + i, 90) for i in range(1, 9)},
                             {i: [f"coco caption {i}", f"second coco caption {i}"] for i in range(1, 9)})
    (root / "coco_keep.txt").write_text("\n".join(str(i) for i in range(1, 8)))  # id 8 left out
    (root / "coco_drop.txt").write_text("7\n")
    regions, meta = inputs.write_visual_genome(root / "vg", {i: inputs.jpeg(100, 130) for i in range(100, 108)},
                                               coco_ids={100: 5, 101: 900})
    (root / "vg_drop_coco.txt").write_text("900\n")  # VG image 101 is COCO image 900: left out
    manifests = inputs.write_manifests(root / "man", {f"m{i}": inputs.jpeg(80, 80) for i in range(8)})
    i2d = inputs.write_img2dataset_tar(root / "i2d", {f"{i:09d}": inputs.jpeg(70, 90) for i in range(8)})
    return {
        "coco": f"coco:captions={coco},images={root / 'coco' / 'images'},include={root / 'coco_keep.txt'},"
                f"exclude={root / 'coco_drop.txt'}",
        "vg": f"vg:regions={regions},meta={meta},images={root / 'vg'},exclude_coco_ids={root / 'vg_drop_coco.txt'}",
        "jsonl": f"manifest:path={manifests['jsonl']},name=jsonl",
        "csv": f"manifest:path={manifests['csv']},image_column=url,name=csv",
        "parquet": f"manifest:path={manifests['parquet']},image_column=path,caption_column=text,"
                   f"key_column=id,name=parquet",
        "i2d": f"img2dataset:path={i2d},name=web",
    }


@pytest.fixture(scope="module")
def mixed_run(mixed_sources, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("mixed") / "shards"
    argv = [a for spec in mixed_sources.values() for a in ("--source", spec)]
    assert _run([*argv, "--out", str(out), "--shard-size", "10", "--max-short-side", "64",
                 "--max-long-side", "100", "--seed", "3"]) == 0
    return out


def test_every_source_format_lands_once_with_its_tag_and_filters(mixed_run):
    samples = _read_back(mixed_run)
    by_source = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key and "." not in key
        by_source.setdefault(meta["source"], set()).add(meta["source_id"])
    assert by_source["coco"] == {str(i) for i in range(1, 7)}            # include 1-7, exclude 7
    assert by_source["vg"] == {str(i) for i in range(100, 108)} - {"101"}  # its COCO id is excluded
    assert by_source["jsonl"] == {f"m{i}" for i in range(8)}
    assert by_source["csv"] == {f"m{i}" for i in range(8)}
    assert by_source["parquet"] == {f"m{i}" for i in range(8)}
    assert by_source["web"] == {f"{i:09d}" for i in range(8)}
    manifest = _manifest(mixed_run)
    assert manifest["num_samples"] == len(samples) == 6 + 7 + 8 * 4
    assert manifest["stats"]["written"] == {s: len(ids) for s, ids in by_source.items()}


def test_sample_layout_captions_and_downscale(mixed_run):
    samples = _read_back(mixed_run)
    coco = samples["coco_3"]
    meta = json.loads(coco["json"])
    assert coco["txt"].decode() == "coco caption 3" == meta["captions"][0]
    assert meta["captions"] == ["coco caption 3", "second coco caption 3"]
    assert (meta["original_width"], meta["original_height"]) == (123, 90)
    image = Image.open(io.BytesIO(coco["jpg"]))
    assert image.size == (meta["width"], meta["height"]) and min(image.size) <= 64 and max(image.size) <= 100
    vg = json.loads(samples["vg_102"]["json"])
    assert vg["captions"] == [f"region {r} of image 102" for r in range(3)]  # duplicate phrase dropped
    assert json.loads(samples["jsonl_m1"]["json"])["captions"] == ["caption one of m1", "caption two of m1"]


def test_shuffled_globally_and_cut_into_shards_of_the_configured_size(mixed_run):
    manifest = _manifest(mixed_run)
    counts = [s["num_samples"] for s in manifest["shards"]]
    assert counts == [10, 10, 10, 10, 5]
    first_shard_sources = {k["key"].split("_")[0] for k in _samples(mixed_run, manifest["shards"][0])}
    assert len(first_shard_sources) >= 3  # sources interleaved, not concatenated


def test_manifest_offsets_and_checksums_locate_every_sample(mixed_run):
    manifest = _manifest(mixed_run)
    samples = _read_back(mixed_run)
    for shard_entry in manifest["shards"]:
        assert "samples" not in shard_entry  # in the shard's table: the manifest lists shards only
        counts = [s["captions"] for s in _samples(mixed_run, shard_entry)]
        assert counts == [len(json.loads(samples[s["key"]]["json"])["captions"])
                          for s in _samples(mixed_run, shard_entry)]
        assert shard_entry["num_captions"] == sum(counts)
    for shard_entry in manifest["shards"]:
        data = (mixed_run / shard_entry["name"]).read_bytes()
        assert len(data) == shard_entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard_entry["sha256"]
        for sample in _samples(mixed_run, shard_entry):
            # seek to the offset and stream from there: the sample's members come first
            with tarfile.open(fileobj=io.BytesIO(data[sample["offset"]:]), mode="r|") as tar:
                names = [next(iter(tar)).name]
            assert names == [f"{sample['key']}.jpg"]
            end = sample["offset"] + sample["size"]
            assert end <= len(data) and end % 512 == 0


def test_dali_index_is_what_wds2idx_writes(mixed_run, tmp_path):
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for shard_entry in _manifest(mixed_run)["shards"][:2]:
        theirs = tmp_path / "theirs.idx"
        subprocess.run([str(wds2idx), str(mixed_run / shard_entry["name"]), str(theirs)], check=True,
                       capture_output=True)
        assert (mixed_run / shard_entry["index"]).read_text() == theirs.read_text()


def test_dali_webdataset_reader_reads_the_shards_with_our_index_files(mixed_run):
    from nvidia.dali import fn, pipeline_def

    manifest = _manifest(mixed_run)
    tars = [str(mixed_run / s["name"]) for s in manifest["shards"]]
    indexes = [str(mixed_run / s["index"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def read():
        images, meta = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "json"],
                                             missing_component_behavior="error", name="reader")
        return fn.decoders.image(images, device="cpu"), meta

    pipe = read()
    pipe.build()
    keys = []
    for _ in range(manifest["num_samples"] // 5):
        images, meta = pipe.run()
        for i in range(len(meta)):
            keys.append(json.loads(bytes(meta.at(i)))["key"])
            assert images.at(i).shape[2] == 3
    assert keys == [s["key"] for sh in manifest["shards"] for s in _samples(mixed_run, sh)]


def test_verify_passes_then_catches_a_changed_shard_and_a_damaged_table(mixed_run, tmp_path, capsys):
    import shutil
    assert verify.main([str(mixed_run)]) == 0
    assert "OK" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(mixed_run, copy)
    tampered = copy / "000001.tar"
    data = bytearray(tampered.read_bytes())
    data[1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    (copy / "000003.tar").unlink()
    # sample #4 of shard 000002 moved back into sample #3, the manifest's table sha256 updated to match
    key = shift_table_row(open_storage(str(copy)), 2, 4, -512)
    assert verify.main([str(copy)]) == 1
    out = capsys.readouterr().out
    assert "000001.tar: sha256" in out and "000003.tar: missing" in out
    [damaged] = [line for line in out.splitlines() if "shard '000002.tar'" in line]
    assert f"sample {key!r}" in damaged and "row 4" in damaged, out


def test_a_v1_dataset_upgraded_in_place_is_the_one_the_job_writes_and_its_tars_are_untouched(mixed_run, tmp_path,
                                                                                               capsys):
    import shutil
    copy = tmp_path / "v1"
    shutil.copytree(mixed_run, copy)
    v2 = as_v1(open_storage(str(copy)))
    v1 = _manifest(copy)
    assert not list(copy.glob("*.samples.npy")) and "samples" in v1["shards"][0]
    tars = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in copy.glob("*.tar")}
    assert verify.main([str(copy)]) == 0  # v1 still reads
    assert upgrade.main([str(copy)]) == 0
    assert "upgraded from pixelbert-dist/webdataset-v1" in capsys.readouterr().out
    upgraded = _manifest(copy)
    assert upgraded["shards"] == v2["shards"] and upgraded["format"] == v2["format"]  # tables as the job writes them
    others = ("shards", "format", "upgraded")
    assert {k: v for k, v in upgraded.items() if k not in others} == {k: v for k, v in v1.items() if k not in others}
    assert {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in copy.glob("*.tar")} == tars
    assert verify.main([str(copy)]) == 0
    before = (copy / MANIFEST).read_bytes()
    assert upgrade.main([str(copy)]) == 0  # idempotent
    assert "already pixelbert-dist/webdataset-v2" in capsys.readouterr().out
    assert (copy / MANIFEST).read_bytes() == before


def test_a_shards_result_holds_counts_not_samples_and_a_v1_shard_gets_its_table_without_a_rewrite(tmp_path):
    """What a shard task returns to the driver must not grow with the shard's samples; a shard an
    earlier version finished (its stats list the samples) is completed with a table, its tar kept."""
    path = generate(tmp_path / "syn", 30, seed=4, min_side=32, max_side=48)
    settings = shard.JobSettings(30, 0, ImageSettings(0, 0))
    [records] = shard.make_plan([SourceSpec.parse(f"coco:captions={path},images={tmp_path / 'syn' / 'images'}")],
                                settings).shards
    storage = open_storage(str(tmp_path / "out"))
    small, big = (shard.build_shard(i, records[:n], settings.image, storage) for i, n in ((0, 3), (1, 30)))
    assert (small.num_samples, big.num_samples, big.num_captions) == (3, 30, 150)
    assert [name for name, value in asdict(big).items() if isinstance(value, list)] == ["skipped_examples"]
    assert len(big.to_json()) - len(small.to_json()) < 16  # a few more digits, not 27 more samples
    assert [s["key"] for s in _samples(tmp_path / "out", asdict(big))] == [r.key for r in records]
    stats = tmp_path / "out" / "000001_stats.json"
    assert "samples" not in json.loads(stats.read_text())
    assert is_job_file(table_name(big.name))  # --overwrite and stale cleanup know the tables
    # as v1 left it: the samples in the stats file, no table
    table = tmp_path / "out" / "000001.samples.npy"
    v1 = {k: v for k, v in asdict(big).items() if k not in ("num_captions", "table_bytes", "table_sha256")}
    v1["samples"] = _samples(tmp_path / "out", asdict(big))
    stats.write_text(json.dumps(v1))
    table_bytes = table.read_bytes()
    table.unlink()
    tar = tmp_path / "out" / "000001.tar"
    written = tar.stat().st_mtime_ns
    assert shard.build_shard(1, records, settings.image, storage) == big
    assert table.read_bytes() == table_bytes and tar.stat().st_mtime_ns == written
    assert shard.ShardResult.from_json(stats.read_text()) == big


def test_bad_inputs_are_skipped_and_counted_by_reason_without_losing_good_ones(tmp_path, ray_local):
    good = {i: inputs.jpeg(90, 70, color=(i * 20, 10, 10)) for i in range(1, 7)}
    valid = inputs.jpeg(100, 80)
    bad = {
        20: valid[: len(valid) // 2],                  # truncated JPEG
        21: b"\xff\xd8\xff\xe0 this is not a jpeg",     # corrupt
        22: b"",                                       # zero bytes
        23: inputs.bomb_header(),                      # claims 50000 x 50000
    }
    converted = {30: inputs.png_with_alpha(), 31: inputs.jpeg(80, 80, color=(10, 20, 30, 40), mode="CMYK"),
                 32: inputs.jpeg(80, 80, color=128, mode="L")}
    captions = {i: [f"caption {i}"] for i in [*good, *bad, *converted, 40]}
    captions[6] = ["   "]  # empty caption
    coco = inputs.write_coco(tmp_path / "coco", {**good, **bad, **converted}, captions,
                             extra_entries={40: "does-not-exist.jpg"})
    # the same images again through a CSV manifest: one non-UTF-8 row, one duplicate key
    rows = [b"key,image,caption", b"dup,imgs/a.jpg,first", b"dup,imgs/b.jpg,second copy of key",
            b"latin,imgs/c.jpg,caf\xe9 au lait", b"ok,imgs/d.jpg,fine"]
    (tmp_path / "imgs").mkdir()
    for name in "abcd":
        (tmp_path / "imgs" / f"{name}.jpg").write_bytes(inputs.jpeg())
    (tmp_path / "rows.csv").write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "out"
    rc = _run(["--source", f"coco:captions={coco},images={tmp_path / 'coco' / 'images'}",
               "--source", f"manifest:path={tmp_path / 'rows.csv'},name=csv",
               "--out", str(out), "--shard-size", "4", "--max-short-side", "0", "--max-long-side", "0"])
    assert rc == 0
    manifest = _manifest(out)
    stats = manifest["stats"]
    assert stats["skipped_by_source"]["coco"] == {"corrupt_image": 2, "empty_file": 1, "too_large": 1,
                                                  "missing_file": 1, "empty_caption": 1}
    assert stats["skipped_by_source"]["csv"] == {"bad_record": 1, "duplicate_key": 1}
    keys = set(_read_back(out))
    assert keys == {f"coco_{i}" for i in [1, 2, 3, 4, 5, 30, 31, 32]} | {"csv_dup", "csv_ok"}
    samples = _read_back(out)
    for key in ("coco_30", "coco_31", "coco_32"):  # converted, not skipped
        assert Image.open(io.BytesIO(samples[key]["jpg"])).mode == "RGB"
    assert samples["csv_dup"]["txt"] == b"first"  # the first occurrence wins
    named = {e["key"] for e in stats["skipped_examples"] if e["key"]}
    assert {"coco_20", "coco_21", "coco_22", "coco_23", "coco_40", "coco_6"} <= named
    assert any("rows.csv:4" in e["image"] for e in stats["skipped_examples"])
    assert verify.main([str(out)]) == 0


def test_original_jpeg_bytes_are_kept_when_nothing_changes(tmp_path, ray_local):
    data = inputs.jpeg(120, 100)
    coco = inputs.write_coco(tmp_path / "c", {1: data, 2: inputs.jpeg(2000, 100)}, {1: ["a"], 2: ["b"]})
    out = tmp_path / "out"
    assert _run(["--source", f"coco:captions={coco},images={tmp_path / 'c' / 'images'}", "--out", str(out),
                 "--max-short-side", "800", "--max-long-side", "1333"]) == 0
    samples = _read_back(out)
    assert samples["coco_1"]["jpg"] == data
    assert Image.open(io.BytesIO(samples["coco_2"]["jpg"])).size == (1333, 67)
    assert _manifest(out)["stats"]["reencoded"] == 1


def test_s3_output_through_moto_and_verify_over_s3(tmp_path, bucket, ray_local):
    path = generate(tmp_path / "syn", 12, seed=1)
    url = f"s3://{bucket}/datasets/syn"
    assert _run(["--source", f"coco:captions={path},images={tmp_path / 'syn' / 'images'}", "--out", url,
                 "--shard-size", "5"]) == 0
    listed = {o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"datasets/syn/000000.tar", "datasets/syn/000002.idx", "datasets/syn/manifest.json"} <= listed
    assert not any(".tmp" in k or "probe" in k for k in listed)
    assert verify.main([url]) == 0


def test_s3_manifest_source_reads_images_from_s3(tmp_path, bucket, ray_local):
    client = s3_client()
    lines = []
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"raw/{i}.jpg", Body=inputs.jpeg(64, 64))
        lines.append(json.dumps({"image": f"s3://{bucket}/raw/{i}.jpg", "caption": f"s3 image {i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    assert _run(["--source", f"manifest:path={tmp_path / 'm.jsonl'}", "--out", str(out)]) == 0
    assert _manifest(out)["num_samples"] == 3


def test_missing_bucket_fails_before_any_work(tmp_path, s3_server, caplog):
    start = time.time()
    rc = _run(["--source", "coco:captions=/nonexistent.json,images=/x", "--out", "s3://no-such-bucket-xyz/p"])
    assert rc == 2
    assert "bucket 'no-such-bucket-xyz' does not exist" in caplog.text
    assert time.time() - start < 20


def test_unwritable_output_and_unreadable_source_fail_before_any_work(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _run(["--source", "coco:captions=x.json,images=y", "--out", str(blocker / "sub")]) == 2
    assert f"output folder {blocker / 'sub'} is not writable" in caplog.text
    assert _run(["--source", f"coco:captions={tmp_path / 'missing.json'},images=y", "--out",
                 str(tmp_path / "o")]) == 2
    assert f"COCO captions {tmp_path / 'missing.json'}" in caplog.text


def test_other_inputs_over_an_existing_output_are_refused_unless_overwrite(tmp_path, ray_local, caplog):
    path = generate(tmp_path / "syn", 6, seed=0)
    source = f"coco:captions={path},images={tmp_path / 'syn' / 'images'}"
    out = str(tmp_path / "out")
    assert _run(["--source", source, "--out", out, "--shard-size", "3"]) == 0
    assert _run(["--source", source, "--out", out, "--shard-size", "2"]) == 2
    assert "made from other inputs or settings" in caplog.text and "--overwrite" in caplog.text
    assert _manifest(Path(out))["num_shards"] == 2  # untouched
    assert _run(["--source", source, "--out", out, "--shard-size", "2", "--overwrite"]) == 0
    assert _manifest(Path(out))["num_shards"] == 3
    assert sorted(p.name for p in Path(out).glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]


def _shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


@pytest.mark.slow
def test_kill_minus_9_mid_run_then_rerun_gives_the_uninterrupted_dataset(tmp_path, ray_local):
    path = generate(tmp_path / "syn", 240, seed=2, min_side=400, max_side=640)
    source = f"coco:captions={path},images={tmp_path / 'syn' / 'images'}"
    settings = ["--shard-size", "4", "--max-short-side", "128", "--max-long-side", "200", "--seed", "5"]
    clean = tmp_path / "clean"
    assert _run(["--source", source, "--out", str(clean), *settings]) == 0

    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "data_pipeline.shard", "--source", source, "--out", str(crashed),
               *settings, "--num-cpus", "1", "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, killed with it
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(crashed.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done_before = len(list(crashed.glob("*_stats.json")))
    assert not (crashed / MANIFEST).exists(), "the job finished before it could be killed"
    assert 1 <= done_before < 60

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _shard_digests(crashed) == _shard_digests(clean)
    assert _manifest(crashed)["shards"] == _manifest(clean)["shards"]  # tables' sha256 included
    assert [p.read_bytes() for p in sorted(crashed.glob("*.samples.npy"))] == \
        [p.read_bytes() for p in sorted(clean.glob("*.samples.npy"))]
    assert not list(crashed.glob(".tmp-*"))
    assert verify.main([str(crashed)]) == 0
