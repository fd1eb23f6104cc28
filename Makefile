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
