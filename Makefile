# `make test` builds .venv on first use, then reuses it: a second run reaches pytest in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first: deepspeed's setup imports torch, so it must be in the venv before the project installs.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	# DeepSpeed JIT-builds its CPU shm comm op (~20 s) at a job's start: build it once here, where
	# the tests look for it (tests/conftest.py), with the venv's ninja.
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions DS_ACCELERATOR=cpu \
	    $(PY) -c "from deepspeed.accelerator import get_accelerator; \
	    get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" 2>/dev/null
	touch $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# img2dataset pins old numpy/pandas/albumentations: it gets a venv of its own for the benchmark.
benchmarks/.venv-img2dataset/bin/img2dataset:
	$(PYTHON) -m venv benchmarks/.venv-img2dataset
	benchmarks/.venv-img2dataset/bin/pip install --quiet img2dataset==1.47.0

.PHONY: bench-sharding
bench-sharding: $(STAMP) benchmarks/.venv-img2dataset/bin/img2dataset
	$(PY) benchmarks/bench_sharding.py

# The main job end to end on this machine: synthetic data -> Ray sharding -> 2-process
# DeepSpeed ZeRO-2 pre-training of the tiny config -> MLflow, with zero-shot retrieval on 100
# held-out images every 550 steps. About 3.5 minutes on 2 cores.
DEMO := runs/demo
DEMO_STEPS ?= 2200
.PHONY: demo
demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) -m data_pipeline.synthetic --out $(DEMO)/synthetic --num-images 2000 --seed 0
	$(PY) -m data_pipeline.shard --out $(DEMO)/shards --shard-size 100 --max-short-side 128 --max-long-side 192 \
	    --source coco:captions=$(DEMO)/synthetic/annotations/captions.json,images=$(DEMO)/synthetic/images
	$(PY) -m data_pipeline.synthetic --out $(DEMO)/heldout --num-images 100 --seed 1
	$(PY) -m data_pipeline.shard --out $(DEMO)/heldout-shards --shard-size 100 --max-short-side 128 --max-long-side 192 \
	    --source coco:captions=$(DEMO)/heldout/annotations/captions.json,images=$(DEMO)/heldout/images --no-progress
	$(PY) -m pixelbert_dist.tokenizer --captions $(DEMO)/synthetic/annotations/captions.json --out $(DEMO)/vocab
	cd $(DEMO) && OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 \
	    $(CURDIR)/$(VENV)/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29533 \
	    -m pixelbert_dist.pretrain --config $(CURDIR)/configs/pretrain/tiny-cpu.yaml --deepspeed.zero_stage=2 \
	    --data.train_manifest=shards --data.tokenizer=vocab/vocab.txt --data.num_workers=1 \
	    --data.eval_manifest=heldout-shards --train.eval_every=550 \
	    --train.max_steps=$(DEMO_STEPS) --train.log_every=25 --checkpoint.dir=checkpoints \
	    --tracking.uri=sqlite:///mlruns.db
	@echo "MLflow run stored in $(DEMO)/mlruns.db; open it with:"
	@echo "  cd $(DEMO) && $(CURDIR)/$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1"

# Does pre-training help? The synthetic VQA / NLVR2 / retrieval tasks fine-tuned from the
# demo's checkpoint and from scratch on the same budget (about 12 minutes on 2 cores).
.PHONY: downstream
downstream: $(STAMP)
	test -d $(DEMO)/checkpoints || $(MAKE) demo
	DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 $(PY) benchmarks/bench_downstream.py \
	    --pretrained $(DEMO)/checkpoints --tokenizer $(DEMO)/vocab/vocab.txt --work runs/downstream

# MLflow's own UI, looked at in headless Chromium (Debian's package, installed if absent):
# two short runs with the same seed, checked through the REST API (names, experiment kind,
# metric sections) and on screen (experiment, compare-runs, charts, run and artifacts pages);
# screenshots and the checks under benchmarks/results/, the compare view in docs/images/.
.PHONY: mlflow-ui-check
mlflow-ui-check: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(PY) benchmarks/mlflow_ui.py
