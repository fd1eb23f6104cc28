"""Pre-training for real: DeepSpeed on gloo, 2 CPU processes, checkpoints, resume, MLflow.

Over 300 lines: every test here shares the one sharded dataset on S3 (the `data` fixture).
"""

import json
import os
from collections import Counter
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.engine import deepspeed_config
from tests.datasets import synthetic_shards
from tests.faults import record_fault
from tests.conftest import TINY, mlflow_metrics as _metrics
from tests.launch import BIN, REPO, free_port, job_env, run_job



@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    """Synthetic shards in a bucket of moto's S3 server: training reads them over HTTP."""
    from data_pipeline.storage import s3_client
    s3_client().create_bucket(Bucket="pretrain-data")
    return synthetic_shards(tmp_path_factory.mktemp("pretrain-data"), 48, seed=11, shard_size=8,
                            out="s3://pretrain-data/shards")


def _argv(data, workdir: Path, **overrides) -> list[str]:
    shards, vocab = data
    settings = {
        "data.train_manifest": shards, "data.tokenizer": vocab, "model.vocab_size": len(vocab.read_text().split()),
        "data.image_short_side": 128, "data.image_long_side": 192, "data.num_workers": 1,
        "model.pixel_sample_count": 4, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "train.epochs": 1, "train.log_every": 1, "checkpoint.every_steps": 4, "checkpoint.dir": workdir / "ckpt",
        "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}", "train.log_pairs_to": workdir / "pairs",
    }  # no deepspeed.config: the shipped config names it relative to itself, and jobs run in workdir
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", str(TINY)] + [f"--{k}={v}" for k, v in settings.items()]


def _torchrun(nproc: int, argv: list[str], workdir: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    return run_job("pretrain", [*argv, *extra], workdir, nproc)


SECRET = "S3cr3t-d0-not-record"  # one distinctive string: any file or line holding it leaks


def _check_password_recorded_nowhere(done, run: Path, stores: list[Path], host: str) -> None:
    """Every file the run wrote, the MLflow server's store and artifacts, and the run's output are
    searched for the password; the recorded config still names the server."""
    leaked = [str(f) for root in [run, *stores] for f in root.rglob("*")
              if f.is_file() and not f.is_symlink() and SECRET.encode() in f.read_bytes()]
    leaked += [stream for stream in ("stdout", "stderr") if SECRET in getattr(done, stream)]
    [state] = run.glob("ckpt/step*/client_state.json")
    resolved = [p for root in stores for p in root.rglob("resolved.yaml")]
    names_host = (json.loads(state.read_text())["config"]["tracking"]["uri"] == f"http://***@{host}"
                  and bool(resolved) and all(f"http://***@{host}" in p.read_text() for p in resolved))
    record_fault({"section": "security", "fault": "credentials in tracking.uri recorded by a run",
                  "what_was_done": "a 2-step pre-training run with tracking.uri http://alice:PASSWORD@<mlflow "
                                   "server>, a checkpoint and the model logged and registered; every file written, "
                                   "the server's store and artifacts, stdout and stderr searched for the password",
                  "expected": "the password in none of them; client_state.json and resolved.yaml show "
                              "http://***@host:port",
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None,
                  "passed": not leaked and names_host})
    assert not leaked, leaked
    assert names_host, (state.read_text()[:2000], resolved)


def _pairs_log(workdir: Path) -> list[dict]:
    rows = []
    for path in sorted((workdir / "pairs").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        rows += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return rows


def _two_rank_run(data, workdir: Path, stage: int, extra: list[str] = (), **overrides) -> subprocess.CompletedProcess:
    # zero-shot retrieval on held-out images every 4 steps (here: 6 images of the training set),
    # split over the ranks; under ZeRO-3 every forward gathers parameters from both
    settings = dict(deepspeed__zero_stage=stage, train__max_steps=8, data__eval_manifest=data[0], train__eval_every=4,
                    train__eval_images=6)
    return _torchrun(2, _argv(data, workdir, **{**settings, **overrides}), workdir, extra)


@pytest.fixture(scope="module")
def zero2_run(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted 2-rank ZeRO-2 run of 8 steps: checked on its own, and the run a resumed
    one must reproduce (each job costs the suite ~15 s)."""
    workdir = tmp_path_factory.mktemp("zero2")
    return workdir, _two_rank_run(data, workdir, 2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_run_learns_checkpoints_and_tracks(data, tmp_path, stage, request):
    if stage == 2:
        tmp_path, done = request.getfixturevalue("zero2_run")
    else:
        done = _two_rank_run(data, tmp_path, stage)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = _metrics(tmp_path / "mlruns.db")  # in MLflow's chart sections: the part before '/'
    assert [s for s, _ in metrics["eval/zeroshot/text_r1"]] == [4, 8]
    assert [v for _, v in metrics["eval/zeroshot/images"]] == [6, 6]
    assert metrics["eval/zeroshot/skipped_pairs"] == [(4, 0.0), (8, 0.0)]  # none damaged
    assert all(0 <= v <= 100 for key in ("eval/zeroshot/text_r1", "eval/zeroshot/image_r10") for _, v in metrics[key])
    for key in ("train/loss", "train/mlm_loss", "train/itm_loss", "train/mlm_accuracy", "train/itm_accuracy",
                "lr/cnn", "lr/transformer", "perf/samples_per_s", "perf/data_wait_fraction", "data/skipped_samples",
                "perf/memory_peak_gib", "perf/mfu", "phase/forward_s", "phase/backward_s", "phase/optimizer_s",
                "phase/data_fraction", "perf/images_per_s", "progress/epoch"):
        assert [s for s, _ in metrics[key]] == list(range(1, 9)), key
    assert {key.partition("/")[0] for key in metrics} <= {"train", "eval", "perf", "phase", "lr", "progress", "data",
                                                          "system"}, sorted(metrics)
    assert all(0 < v < 1 for _, v in metrics["perf/mfu"])
    itm = [v for _, v in metrics["train/itm_accuracy"]]  # in %, as evaluation reports: ~50 before ITM learns
    assert all(0 <= v <= 100 for v in itm) and max(itm) > 1
    for step in range(1, 9):  # the phases and the rest make up the step
        fracs = sum(dict(metrics[k])[step] for k in metrics if k.startswith("phase/") and k.endswith("_fraction"))
        assert fracs == pytest.approx(1.0, abs=1e-6)
    losses = [v for _, v in metrics["train/loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns (MLM on a tiny vocab drops fast)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["step00000004", "step00000008"]
    pairs = [tuple(p) for row in _pairs_log(tmp_path) for p in row["pairs"]]
    assert len(pairs) == len(set(pairs)) == 8 * 8  # 8 steps x 2 ranks x 4 pairs, none twice
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        params = dict(con.execute("select key, value from params").fetchall())
        tags = dict(con.execute("select key, value from tags").fetchall())
    assert params["world_size"] == "2" and params["deepspeed.zero_stage"] == str(stage)
    assert params["data.decoder"] == "auto" and params["data.decoder_used"] == "cpu"  # no GPU here
    assert tags["launcher"] == "torchrun" and "checkpoint.step00000008" in tags

    # export the ZeRO checkpoint to safetensors and load it back
    from pixelbert_dist import checkpoint, export
    from pixelbert_dist.flops import synthetic_batch
    from pixelbert_dist.model import PixelBert
    assert export.main([str(tmp_path / "ckpt" / "step00000008"), str(tmp_path / "exported")]) == 0
    exported = export.load_exported(tmp_path / "exported").eval()
    reference = PixelBert(exported.cfg)
    fresh_weight = reference.visual.proj.weight.detach().clone()
    checkpoint.load_weights_only(reference, tmp_path / "ckpt", "step00000008")
    reference.eval()
    assert not torch.equal(fresh_weight, exported.visual.proj.weight)  # trained weights, not init
    batch = synthetic_batch(exported.cfg.vocab_size, 2, (128, 192), 10)
    with torch.no_grad():
        assert torch.equal(exported(batch).itm_logits, reference(batch).itm_logits)
    assert exported.cls.predictions.decoder.weight is exported.bert.embeddings.word_embeddings.weight


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_and_2_ranks_resume_as_1(data, tmp_path, zero2_run):
    full, done = zero2_run
    assert done.returncode == 0, done.stderr[-3000:]

    part = tmp_path / "part"
    done = _two_rank_run(data, part, 2, train__max_steps=4)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _two_rank_run(data, part, 2, ["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {(r["rank"], r["step"], tuple(map(tuple, r["pairs"]))): r["loss"] for r in _pairs_log(full)}
    resumed = {(r["rank"], r["step"], tuple(map(tuple, r["pairs"]))): r["loss"] for r in _pairs_log(part)}
    assert resumed.keys() == expected.keys()  # same pairs at the same steps on the same ranks
    for key, loss in expected.items():
        # bit-exact with frozen norms; with the tiny config's trainable norms we have seen
        # 1.3e-4 relative (not yet explained). A wrong batch or state moves it by >1e-2.
        assert resumed[key] == pytest.approx(loss, rel=1e-3), key
    runs = {r for r, in sqlite3.connect(part / "mlruns.db").execute("select distinct run_uuid from metrics")}
    assert len(runs) == 1  # the resumed job continued the same MLflow run

    # the same checkpoint at step 4, resumed on one rank, finishes the epoch: every pair once
    single = tmp_path / "single"
    (single / "ckpt").mkdir(parents=True)
    os.symlink(part / "ckpt" / "step00000004", single / "ckpt" / "step00000004")
    (single / "pairs").mkdir()
    for path in (part / "pairs").glob("*.jsonl"):  # the 2-rank run's first four steps
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < 4]
        (single / "pairs" / f"before-{path.name}").write_text("\n".join(rows) + "\n")
    done = _torchrun(1, _argv(data, single), single, ["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [tuple(p) for path in (single / "pairs").glob("*.jsonl")
            for line in path.read_text().splitlines() for p in json.loads(line)["pairs"]]
    assert len(seen) == len(set(seen))
    from pixelbert_dist.data.plan import Manifest
    assert Manifest(data[0]).total_pairs - len(seen) < 8


@pytest.mark.slow
def test_compiled_zero2_run_trains_on_the_eager_runs_losses(data, tmp_path, monkeypatch):
    # train.compile under the DeepSpeed engine (ZeRO-2's gradient hooks on compiled modules),
    # frozen norms folded, canvases bucketed to 128 px. CNN widths 16..128: torch 2.14.1's inductor
    # aborts in the CPU backward of 8-channel convs (torchvision's own ResNet too).
    # The eager run also meets a tracking server that is down: a warning, not the run's end.
    from pixelbert_dist import checkpoint
    from pixelbert_dist.model import PixelBert
    losses = {}
    for compiled in (False, True):
        workdir = tmp_path / f"compile-{compiled}"
        tracking = {} if compiled else {"tracking__uri": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))  # what inductor compiled
        argv = _argv(data, workdir, train__max_steps=3, train__compile=compiled, model__train_backbone_norm="false",
                     model__backbone_widths="[16,32,64,128]", data__pad_multiple=128, data__num_workers=0,
                     train__micro_batch_size=4, train__global_batch_size=4, **tracking)
        done = _torchrun(1, argv, workdir)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[compiled] = [r["loss"] for r in _pairs_log(workdir)]
        assert any((workdir / "inductor").rglob("*.py")) == compiled  # compiled kernels only where asked
        if not compiled:
            assert "MLflow start failed" in done.stderr and "training continues without tracking" in done.stderr
    assert len(losses[True]) == 3
    # Inductor fuses and reorders float arithmetic: the same losses to float tolerance, not bit for bit.
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    # Module.compile keeps the parameter names: the compiled run's checkpoint loads into a plain model
    cfg = load_config(TINY, argv[2:])
    checkpoint.load_weights_only(PixelBert(cfg.model), tmp_path / "compile-True" / "ckpt", "step00000003")


def test_deepspeed_json_conflicts_and_shapes_are_named_before_training(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1}}))
    cfg = load_config(TINY, [f"--deepspeed.config={ds}"])
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=32 conflicts with the run config \(16\)"):
        deepspeed_config(cfg, world_size=2)
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16"):
        deepspeed_config(cfg, world_size=2)
    ds.write_text(json.dumps({"bf16": {"check_grad_overflow": False}}))  # the JSON's own key: no conflict
    merged = deepspeed_config(load_config(TINY, [f"--deepspeed.config={ds}", "--train.precision=bf16"]), world_size=2)
    assert merged["bf16"] == {"check_grad_overflow": False, "enabled": True}
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    merged = deepspeed_config(cfg, world_size=2)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["gradient_accumulation_steps"] == 1 and merged["train_batch_size"] == 32
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size x world size \(16 x 3\)"):
        deepspeed_config(cfg, world_size=3)


@pytest.mark.slow
def test_deepspeed_launcher_trains_a_mixture_mirrors_to_s3_and_a_fresh_node_resumes_from_the_mirror(data, tmp_path,
                                                                                                      bucket):
    # the same shards as two datasets of a mixture (weights 1 and 0.5): both are read and logged
    from data_pipeline.storage import open_storage
    mixture = f"[{{name: a, manifest: '{data[0]}', weight: 1}}, {{name: b, manifest: '{data[0]}', weight: 0.5}}]"
    mirror = f"s3://{bucket}/run1"
    settings = dict(data__train_manifest="", data__mixture=mixture, checkpoint__every_steps=2,
                    checkpoint__keep_last=1, checkpoint__mirror=mirror)
    command = [str(BIN / "deepspeed"), "--hostfile", str(REPO / "cluster/hosts"), "--no_ssh", "--node_rank=0",
               "--master_addr", "127.0.0.1", f"--master_port={free_port()}", "--module", "pixelbert_dist.pretrain",
               *_argv(data, tmp_path, train__max_steps=4, **settings)]
    env = {**job_env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        tags = dict(con.execute("select key, value from tags").fetchall())
        params = dict(con.execute("select key, value from params").fetchall())
    assert tags["launcher"] == "deepspeed" and params["world_size"] == "2"
    rows = _pairs_log(tmp_path)
    assert len({r["rank"] for r in rows}) == 2
    trained = Counter(shard.partition("/")[0] for r in rows for shard, _ in r["pairs"])
    metrics = _metrics(tmp_path / "mlruns.db")
    logged = {name: metrics[f"data/pairs/{name}"][-1][1] for name in "ab"}
    assert logged == trained and sum(trained.values()) == 4 * 8  # every pair trained, counted under its dataset

    local = tmp_path / "ckpt" / "step00000004"
    mirrored = [n for n in open_storage(mirror).list()]
    assert all(n.startswith("step00000004/") for n in mirrored)  # step 2 pruned there too
    assert sorted(n.split("/", 1)[1] for n in mirrored) == sorted(
        p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert any("zero_pp_rank_1_" in n for n in mirrored)  # rank 1 sent its own partition

    # a fresh node: no local checkpoints; --resume auto fetches step 4 and continues to 6
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    done = _torchrun(2, _argv(data, tmp_path, train__max_steps=6, **settings), tmp_path, ["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step 4" in done.stderr
    steps = sorted({r["step"] for r in _pairs_log(tmp_path)})
    assert steps == list(range(6))  # 0-3 before, 4-5 after the resume: nothing repeated
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        tags = dict(con.execute("select key, value from tags").fetchall())
    assert tags["checkpoint.step00000006"] == f"{mirror}/step00000006"


def test_a_missing_mirror_bucket_is_an_error_before_any_step(data, tmp_path):
    done = _torchrun(1, _argv(data, tmp_path, train__max_steps=2, checkpoint__mirror="s3://no-such-bucket/x"),
                     tmp_path)
    assert done.returncode != 0
    assert "no-such-bucket" in done.stderr and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_sharding_and_pretraining_under_ray_job_submit_on_a_ray_start_cluster(data, tmp_path, ray_head):
    # the user's path on a cluster, with token authentication as docs/training.md sets it up: the
    # sharding job, then pre-training on its shards with Ray Train workers (one head for both)
    from data_pipeline import verify
    from data_pipeline.synthetic import generate
    captions = generate(tmp_path / "syn", 10, seed=3)
    shards = tmp_path / "shards"

    def submit(*entrypoint: str, env_vars: dict | None = None) -> subprocess.CompletedProcess:
        runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head["jobs"], "--working-dir",
                               str(REPO), *runtime, "--", *entrypoint],
                              env=ray_head["env"], capture_output=True, text=True, timeout=600)

    done = submit("python", "-m", "data_pipeline.shard", "--source",
                  f"coco:captions={captions},images={tmp_path / 'syn' / 'images'}", "--out", str(shards),
                  "--shard-size", "4", "--no-progress")
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((shards / "manifest.json").read_text())["num_samples"] == 10 and verify.main([str(shards)]) == 0

    argv = _argv(data, tmp_path, train__max_steps=3, data__train_manifest=shards)
    done = submit("python", "-m", "pixelbert_dist.pretrain", "--launcher", "ray", "--num-workers", "2", *argv,
                  env_vars={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                            "PIXELBERT_RAY_STORAGE": str(tmp_path / "ray")})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    with sqlite3.connect(tmp_path / "mlruns.db") as con:
        tags = dict(con.execute("select key, value from tags").fetchall())
        params = dict(con.execute("select key, value from params").fetchall())
    assert tags["launcher"] == "ray" and params["world_size"] == "2"
    assert (tmp_path / "ckpt" / "step00000003" / "complete.json").exists()
    trained = {shard.partition("/")[0] for row in _pairs_log(tmp_path) for shard, _ in row["pairs"]}
    assert trained and all((shards / name).is_file() for name in trained)  # the sharding job's shards


def test_ray_workers_run_in_the_folder_the_job_was_started_from(tmp_path, monkeypatch, capsys, ray_local):
    # `python -m pixelbert_dist.pretrain --launcher ray --config configs/...` run directly (not
    # through `ray job submit --working-dir`): Ray starts its workers in its own session folder,
    # where the command line's relative paths named nothing
    from pixelbert_dist import ray_launcher
    (tmp_path / "relative.txt").write_text("found")
    monkeypatch.chdir(tmp_path)

    def run(launcher: str) -> int:  # a job's run function, as cli.py hands it over
        return 0 if Path("relative.txt").is_file() and launcher == "ray" else 3

    monkeypatch.setenv("PIXELBERT_RAY_STORAGE", str(tmp_path / "ray"))
    assert ray_launcher.launch(run, "probe", num_workers=1, max_failures=0) == 0, capsys.readouterr().err[-3000:]


def _rest(url: str, body: dict | None = None) -> dict:
    import urllib.request
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_mlflow_server_holds_the_runs_metrics_config_model_and_registry_entry(data, tmp_path, mlflow_server,
                                                                                  tmp_path_factory):
    mlflow_server_root = sorted(tmp_path_factory.getbasetemp().glob("mlflow-server*"))
    import urllib.request

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load as load_safetensors

    # bf16 under ZeRO-2: the logged model must be the optimizer's fp32 masters, not the bf16 copies.
    # The URI carries a password (the server ignores it): no file, log line or artifact may hold it.
    host = mlflow_server.removeprefix("http://")
    done = _torchrun(1, _argv(data, tmp_path, train__max_steps=2, train__precision="bf16", checkpoint__every_steps=2,
                              tracking__uri=f"http://alice:{SECRET}@{host}", tracking__experiment="home",
                              tracking__register_model="pixelbert-tiny"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_password_recorded_nowhere(done, tmp_path, mlflow_server_root, host)
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = _rest(f"{api}/experiments/get-by-name?experiment_name=home")["experiment"]["experiment_id"]
    [run] = _rest(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
    run_id = run["info"]["run_id"]
    assert {m["key"] for m in run["data"]["metrics"]} >= {"train/loss", "train/mlm_loss", "train/itm_loss",
                                                          "perf/samples_per_s", "perf/mfu"}

    def listing(path: str) -> set[str]:
        files = _rest(f"{api}/artifacts/list?run_id={run_id}&path={path}").get("files", [])
        return {f["path"].rsplit("/", 1)[-1] for f in files}

    assert listing("config") == {"resolved.yaml", "deepspeed.json"}
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= listing("model"), listing("model")
    versions = _rest(f"{api}/registered-models/get?name=pixelbert-tiny")["registered_model"]["latest_versions"]
    assert [v["run_id"] for v in versions] == [run_id]

    with urllib.request.urlopen(f"{mlflow_server}/get-artifact?path=model/model.safetensors&run_uuid={run_id}") as r:
        logged = load_safetensors(r.read())
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="step00000002")
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # saved once, as their originals
    assert masters.keys() <= logged.keys() | tied
    assert logged["bert.embeddings.word_embeddings.weight"].dtype == torch.float32
    for name, tensor in masters.items():  # a bf16 copy would differ from its master in the low bits
        if name in logged:
            assert torch.equal(logged[name].float(), tensor.float()), name
