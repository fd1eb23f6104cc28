"""Hostile source annotations and output folders, driven through the shard job's own functions.

Annotations that name files outside their image root (absolute names, `../` climbs, symlinks)
are skipped unread as `unsafe_path`; FIFOs, devices and folders as `not_a_file`; files over the
byte cap as `too_large`: counted and named in the manifest, never read into a shard, never a
hang or a huge allocation. `--overwrite` deletes only the job's own top-level files. The job
runs here without Ray (make_plan, prepare_output, build_shard, write_manifest: what `main`
calls around its Ray tasks). Each test records its row of the fault table before asserting.
"""

import json
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from data_pipeline import shard
from data_pipeline.images import ImageSettings
from data_pipeline.shard_format import JOB, MANIFEST
from data_pipeline.sources import SourceSpec
from data_pipeline.storage import open_storage, s3_client
from tests import sample_inputs as inputs
from tests.faults import record_fault

NO_HANG_S = 30
MEMORY_BOUND = 16 << 20  # traced bytes the whole job may hold at once here (its images are a few KB)


def _job(specs: list[str], out: Path, image: ImageSettings = ImageSettings()) -> tuple[dict, bytes]:
    """The shard job without Ray: (its manifest, the bytes of every tar it wrote)."""
    settings = shard.JobSettings(100, 0, image)
    plan = shard.make_plan([SourceSpec.parse(s) for s in specs], settings)
    storage = open_storage(str(out))
    shard.prepare_output(storage, plan, settings, overwrite=False)
    results = [shard.build_shard(i, records, image, storage) for i, records in enumerate(plan.shards)]
    manifest = shard.write_manifest(storage, plan, settings, results, specs, 0.0)
    return manifest, b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))


def _bounded(run) -> tuple[object, float, int]:
    """run() in a thread: (its result or exception, seconds, peak traced bytes); None if it hung."""
    box = {}
    tracemalloc.start()
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: box.update(result=_call(run)), daemon=True)
    thread.start()
    thread.join(NO_HANG_S)
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return box.get("result"), seconds, peak


def _call(run):
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - the test names it
        return err


def _outside(tmp_path: Path, names: list[str]) -> dict[str, Path]:
    """A folder beside the image roots holding one distinct JPEG per name (what must not be read)."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    files = {}
    for i, name in enumerate(names):
        files[name] = tmp_path / "outside" / name
        files[name].write_bytes(inputs.jpeg(61 + i, 47, color=(10 * i, 255 - 10 * i, 99)))
    return files


def _skipped(manifest: dict) -> dict:
    return manifest["stats"]["skipped_by_source"]


def test_coco_names_outside_the_image_root_are_skipped_unread_as_unsafe_path(tmp_path):
    outside = _outside(tmp_path, ["abs.jpg", "climb.jpg", "linked.jpg"])
    images = tmp_path / "coco" / "images"
    captions = inputs.write_coco(tmp_path / "coco", {1: inputs.jpeg(40, 30)}, {i: [f"caption {i}"] for i in range(1, 6)},
                                 extra_entries={2: str(outside["abs.jpg"]), 3: "../../outside/climb.jpg",
                                                4: "link.jpg", 5: "alias.jpg"})
    (images / "link.jpg").symlink_to(outside["linked.jpg"])
    (images / "alias.jpg").symlink_to(images / "000000000001.jpg")  # a symlink that stays inside is fine
    manifest, tars = _job([f"coco:captions={captions},images={images}"], tmp_path / "out")

    text = (tmp_path / "out" / MANIFEST).read_text()
    examples = {e["key"]: e for e in manifest["stats"]["skipped_examples"]}
    leaked = [name for name, path in outside.items() if path.read_bytes() in tars]
    ok = (manifest["num_samples"] == 2 and _skipped(manifest) == {"coco": {"unsafe_path": 3}}
          and set(examples) == {"coco_2", "coco_3", "coco_4"} and not leaked
          and examples["coco_4"]["image"] == str(images / "link.jpg")
          and str(outside["linked.jpg"]) not in text and str(outside["climb.jpg"]) not in text)
    record_fault({"section": "security", "fault": "annotation names a file outside the image root",
                  "what_was_done": "COCO captions whose file_name is an absolute outside path, a ../ climb, and a "
                                   "symlink in the image folder to an outside JPEG (plus one inside-pointing symlink)",
                  "expected": "3 records skipped unread as unsafe_path, named by key and annotation name; outside "
                              "bytes in no tar; the resolved outside paths in no manifest",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": ok})
    assert not leaked, f"outside files written into a shard: {leaked}"
    assert _skipped(manifest) == {"coco": {"unsafe_path": 3}} and manifest["num_samples"] == 2
    assert set(examples) == {"coco_2", "coco_3", "coco_4"}
    assert "outside the image root" in examples["coco_3"]["detail"]
    assert examples["coco_4"]["image"] == str(images / "link.jpg")  # the annotation's name, not where it leads
    assert str(outside["linked.jpg"]) not in text and str(outside["climb.jpg"]) not in text


def test_every_reader_shares_the_containment_check(tmp_path):
    outside = _outside(tmp_path, ["karpathy.jpg", "vg.jpg", "train-1-0-img0.png", "train-1-0-img1.png",
                                  "manifest-climb.jpg", "manifest-abs.jpg", "i2d.jpg"])
    good = inputs.jpeg(33, 33)
    (tmp_path / "k" / "sub").mkdir(parents=True)
    (tmp_path / "k" / "sub" / "1.jpg").write_bytes(good)
    (tmp_path / "k.json").write_text(json.dumps({"images": [
        {"cocoid": 1, "filepath": "sub", "filename": "1.jpg", "split": "train", "sentences": [{"raw": "good"}]},
        {"cocoid": 2, "filepath": "..", "filename": "outside/karpathy.jpg", "split": "train",
         "sentences": [{"raw": "climbs out"}]}]}))
    (tmp_path / "vg" / "VG_100K").mkdir(parents=True)
    (tmp_path / "vg" / "VG_100K" / "7.jpg").symlink_to(outside["vg.jpg"])
    (tmp_path / "vg_meta.json").write_text(json.dumps([{"image_id": 7, "url": "https://x.invalid/VG_100K/7.jpg"}]))
    (tmp_path / "vg_regions.json").write_text(json.dumps([{"id": 7, "regions": [{"phrase": "a region"}]}]))
    (tmp_path / "nlvr2").mkdir()
    (tmp_path / "nlvr2.json").write_text(json.dumps({"identifier": "train-1-0-0", "sentence": "two dogs",
                                                     "label": "True", "directory": "../outside"}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"key": "climb", "image": "../outside/manifest-climb.jpg", "caption": "c"},
        {"key": "abs", "image": str(outside["manifest-abs.jpg"]), "caption": "c"}]))
    (tmp_path / "i2d" / "00000").mkdir(parents=True)
    (tmp_path / "i2d" / "00000" / "k.jpg").symlink_to(outside["i2d.jpg"])
    (tmp_path / "i2d" / "00000" / "k.txt").write_text("caption")
    specs = [f"karpathy:path={tmp_path / 'k.json'},images={tmp_path / 'k'},split=train",
             f"vg:regions={tmp_path / 'vg_regions.json'},meta={tmp_path / 'vg_meta.json'},images={tmp_path / 'vg'}",
             f"nlvr2:path={tmp_path / 'nlvr2.json'},images={tmp_path / 'nlvr2'}",
             f"manifest:path={tmp_path / 'm.jsonl'},images={tmp_path / 'm'}",
             f"img2dataset:path={tmp_path / 'i2d'}"]
    manifest, tars = _job(specs, tmp_path / "out")

    leaked = [name for name, path in outside.items() if path.read_bytes() in tars]
    expected = {"karpathy": {"unsafe_path": 1}, "vg": {"unsafe_path": 1}, "nlvr2": {"unsafe_path": 1},
                "manifest": {"unsafe_path": 2}, "img2dataset": {"unsafe_path": 1}}
    ok = not leaked and _skipped(manifest) == expected and manifest["num_samples"] == 1
    record_fault({"section": "security", "fault": "annotation names a file outside the image root (every reader)",
                  "what_was_done": "Karpathy filepath '..', a VG image that is a symlink out, an NLVR2 directory "
                                   "'../outside' (both images), a manifest with images= naming a ../ climb and an "
                                   "absolute outside path, an img2dataset files-format image symlinked out",
                  "expected": "each counted unsafe_path under its source, unread; only the one inside image written",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": ok})
    assert not leaked, f"outside files written into a shard: {leaked}"
    assert _skipped(manifest) == expected
    assert manifest["num_samples"] == 1 and good in tars


def test_s3_images_outside_the_root_prefix_or_over_the_cap_are_skipped_unread(tmp_path, bucket):
    good, big, secret = inputs.jpeg(20, 20), inputs.jpeg(300, 300, color=(1, 2, 3)), inputs.jpeg(25, 25, color=(9, 9, 9))
    for key, data in (("imgs/good.jpg", good), ("imgs/big.jpg", big), ("other/secret.jpg", secret)):
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"key": "good", "image": "good.jpg", "caption": "c"},
        {"key": "climb", "image": "../other/secret.jpg", "caption": "c"},
        {"key": "other", "image": f"s3://{bucket}/other/secret.jpg", "caption": "c"},
        {"key": "local", "image": "/etc/hostname", "caption": "c"},
        {"key": "big", "image": "big.jpg", "caption": "c"}]))
    cap = len(good) + 100
    assert len(big) > cap
    manifest, tars = _job([f"manifest:path={tmp_path / 'm.jsonl'},images=s3://{bucket}/imgs"], tmp_path / "out",
                          ImageSettings(max_file_bytes=cap))

    expected = {"manifest": {"unsafe_path": 3, "too_large": 1}}
    ok = secret not in tars and big not in tars and good in tars and _skipped(manifest) == expected
    record_fault({"section": "security", "fault": "S3 annotation outside its root prefix / over the byte cap",
                  "what_was_done": "manifest with images=s3://bucket/imgs naming ../other/secret.jpg, "
                                   "s3://bucket/other/secret.jpg, a local /etc/hostname, and an object over "
                                   "--max-file-bytes",
                  "expected": "3 unsafe_path and 1 too_large (size from a HEAD, body never fetched); none in a tar",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": ok})
    assert secret not in tars and big not in tars and good in tars
    assert _skipped(manifest) == expected


def test_fifos_devices_and_folders_are_refused_without_a_hang_or_a_big_read(tmp_path):
    images = tmp_path / "coco" / "images"
    captions = inputs.write_coco(tmp_path / "coco", {1: inputs.jpeg(40, 30)}, {1: ["ok"], 2: ["fifo"]},
                                 extra_entries={2: "fifo.jpg"})
    os.mkfifo(images / "fifo.jpg")  # inside the root: refused for what it is
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"key": k, "image": p, "caption": "c"}) + "\n" for k, p in
                                              [("zero", "/dev/zero"), ("pipe", str(tmp_path / "pipe.jpg")),
                                               ("folder", str(tmp_path / "folder.jpg"))]))
    (tmp_path / "i2d" / "00000").mkdir(parents=True)  # a caption that is a FIFO, read while planning
    (tmp_path / "i2d" / "00000" / "k.jpg").write_bytes(inputs.jpeg(30, 30))
    os.mkfifo(tmp_path / "i2d" / "00000" / "k.txt")
    specs = [f"coco:captions={captions},images={images}", f"manifest:path={tmp_path / 'm.jsonl'}",
             f"img2dataset:path={tmp_path / 'i2d'}"]
    result, seconds, peak = _bounded(lambda: _job(specs, tmp_path / "out"))

    finished = isinstance(result, tuple)
    skipped = _skipped(result[0]) if finished else result
    expected = {"coco": {"not_a_file": 1}, "manifest": {"not_a_file": 3},
                "img2dataset": {"bad_record": 1, "empty_caption": 1}}  # its only caption was not read
    ok = finished and skipped == expected and peak < MEMORY_BOUND
    record_fault({"section": "security", "fault": "annotation names a FIFO, /dev/zero or a folder",
                  "what_was_done": "COCO file_name a FIFO inside the image folder; a manifest naming /dev/zero, a FIFO "
                                   "and a folder; an img2dataset caption .txt that is a FIFO",
                  "expected": f"not_a_file x4 (the caption: bad_record), within {NO_HANG_S} s, peak traced memory "
                              f"under {MEMORY_BOUND >> 20} MiB",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": round(seconds, 2), "passed": ok})
    assert finished, f"the job hung or failed on a FIFO or device: {result!r}"
    assert skipped == expected
    assert peak < MEMORY_BOUND, f"{peak} bytes traced"
    examples = {e["key"]: e for e in result[0]["stats"]["skipped_examples"]}
    assert examples["manifest_zero"]["image"] == "/dev/zero" and "not a regular file" in examples["manifest_zero"]["detail"]


def test_a_file_over_the_byte_cap_is_skipped_before_it_is_read(tmp_path):
    images = tmp_path / "coco" / "images"
    small, medium = inputs.jpeg(20, 20), inputs.jpeg(200, 150, color=(3, 90, 200))
    captions = inputs.write_coco(tmp_path / "coco", {1: small, 2: medium}, {i: ["c"] for i in (1, 2, 3)},
                                 extra_entries={3: "huge.jpg"})
    with open(images / "huge.jpg", "wb") as f:  # 1 GiB, sparse: costs no disk, would cost 1 GiB of memory
        f.truncate(1 << 30)
    result, seconds, peak = _bounded(lambda: _job([f"coco:captions={captions},images={images}"], tmp_path / "default"))
    capped = _job([f"coco:captions={captions},images={images}"], tmp_path / "capped",
                  ImageSettings(max_file_bytes=len(small) + 100))

    finished = isinstance(result, tuple)
    ok = (finished and _skipped(result[0]) == {"coco": {"too_large": 1}} and peak < MEMORY_BOUND
          and _skipped(capped[0]) == {"coco": {"too_large": 2}} and medium not in capped[1] and small in capped[1])
    record_fault({"section": "security", "fault": "source file over the byte cap",
                  "what_was_done": "a 1 GiB (sparse) huge.jpg under the default 64 MiB cap; a real JPEG over a cap "
                                   "set through ImageSettings.max_file_bytes (--max-file-bytes)",
                  "expected": f"too_large, skipped before reading: peak traced memory under {MEMORY_BOUND >> 20} MiB",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": round(seconds, 2), "passed": ok})
    assert finished, f"the job failed on a 1 GiB file: {result!r}"
    assert _skipped(result[0]) == {"coco": {"too_large": 1}} and peak < MEMORY_BOUND, peak
    assert _skipped(capped[0]) == {"coco": {"too_large": 2}}
    assert medium not in capped[1] and small in capped[1]
    with pytest.raises(SystemExit):  # above a shard member's cap the loader would refuse the shard
        shard.parse_args(["--source", "x", "--out", "y", "--max-file-bytes", str(65 << 20)])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_overwrite_deletes_only_the_jobs_top_level_files(tmp_path, where, request):
    if where == "s3":
        url = f"s3://{request.getfixturevalue('bucket')}/data"
    else:
        url = str(tmp_path / "data")
    storage = open_storage(url)
    old_job = {n: f"old {n}".encode() for n in ("000000.tar", "000000.idx", "000000_stats.json", "000001.tar",
                                                 "000001.samples.npy", MANIFEST)}
    old_job[JOB] = json.dumps({"fingerprint": "an older job's", "settings": {}}).encode()
    theirs = {"other-dataset/000000.tar": b"their shard", "other-dataset/000000.samples.npy": b"their table",
              "other-dataset/manifest.json": b"{}",
              "other-dataset/_job.json": b"{}", "sub/.tmp-draft.txt": b"a user's draft",
              ".tmp-draft.txt": b"a user's draft at the top", "notes.txt": b"notes"}
    for name, data in {**old_job, **theirs}.items():
        storage.write_bytes(name, data)
    stale = f".tmp-{'0' * 32}-000002.tar"  # what a killed writer of this folder leaves
    if where == "local":
        (tmp_path / "data" / stale).write_bytes(b"half a shard")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "1.jpg").write_bytes(inputs.jpeg(30, 20))
    (tmp_path / "m.jsonl").write_text(json.dumps({"key": "a", "image": "src/1.jpg", "caption": "new"}) + "\n")
    settings = shard.JobSettings(10, 0, ImageSettings())
    plan = shard.make_plan([SourceSpec.parse(f"manifest:path={tmp_path / 'm.jsonl'}")], settings)

    with pytest.raises(shard.StorageError, match="rerun with --overwrite"):
        shard.prepare_output(storage, plan, settings, overwrite=False)
    shard.prepare_output(storage, plan, settings, overwrite=True)
    shard.build_shard(0, plan.shards[0], settings.image, storage)
    shard.write_manifest(storage, plan, settings, [], [], 0.0)

    names = set(storage.list())
    survived = {n: storage.read_bytes(n) for n in theirs if n in names}
    replaced = all(storage.read_bytes(n) != old_job[n] for n in ("000000.tar", MANIFEST, JOB))
    ok = (survived == theirs and not {"000001.tar", "000001.samples.npy"} & names and replaced and stale not in names)
    record_fault({"section": "security", "fault": f"--overwrite deleting other datasets ({where})",
                  "what_was_done": f"shard --overwrite into {'a folder' if where == 'local' else 's3://bucket/data'} "
                                   "holding an old job's files (a sample table among them) plus "
                                   "other-dataset/{000000.tar,000000.samples.npy,manifest.json,_job.json}, "
                                   "sub/.tmp-draft.txt, a top-level .tmp-draft.txt and notes.txt",
                  "expected": "the old job's top-level files replaced or deleted (and its stale .tmp-<uuid>-* "
                              "temporary); every other file survives byte-identical",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": ok})
    assert survived == theirs, f"lost: {sorted(set(theirs) - set(survived))}"
    assert not {"000001.tar", "000001.samples.npy"} & names and stale not in names  # its table too
    assert replaced


def test_a_dataset_in_a_subfolder_does_not_block_a_new_job_beside_it(tmp_path):
    storage = open_storage(str(tmp_path / "data"))
    storage.write_bytes("other-dataset/manifest.json", b"{}")
    storage.write_bytes("other-dataset/_job.json", json.dumps({"fingerprint": "theirs"}).encode())
    (tmp_path / "1.jpg").write_bytes(inputs.jpeg(30, 20))
    (tmp_path / "m.jsonl").write_text(json.dumps({"key": "a", "image": "1.jpg", "caption": "new"}) + "\n")
    settings = shard.JobSettings(10, 0, ImageSettings())
    plan = shard.make_plan([SourceSpec.parse(f"manifest:path={tmp_path / 'm.jsonl'}")], settings)
    try:
        shard.prepare_output(storage, plan, settings, overwrite=False)
        refused = None
    except shard.StorageError as err:
        refused = err
    ok = refused is None and storage.read_bytes("other-dataset/manifest.json") == b"{}"
    record_fault({"section": "security", "fault": "a subfolder's dataset taken for the job's own",
                  "what_was_done": "shard (no --overwrite) into a folder whose only files are other-dataset/*",
                  "expected": "the job proceeds; other-dataset/ untouched",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": ok})
    assert refused is None, refused
    assert json.loads(storage.read_bytes(JOB))["fingerprint"] == plan.fingerprint
