# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: demo test test-fast setup prometheus bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch pinned (here and in pyproject.toml): the CPU wheel is on local disk here; an unpinned torch would pull
# a CUDA build. One pip run resolves torch and the project together (~5 s less than two runs).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stylegen.demo --out $(OUT)

# The full suite (what CI runs), on 2 pytest-xdist workers: the Ray tests mostly wait on process start-up
# and polls, so two workers help even on 2 cores (8.4-9.5 min in the latest clean-clone runs here, vs
# 24.9 serially). Each worker takes whole
# files (a module fixture is built once; tests/test_xdist.py says why not --dist loadgroup), the files
# with the most ray/slow tests first (tests/conftest.py). The 20 slowest are printed at the end.
# PYTEST_ARGS="-n 0" runs it serially.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS)

# The developer loop: unit tests of pure code (no Ray, no Prometheus, no training subprocesses).
# The files are the ones whose tests are pure; slow/ray/prometheus-marked tests in them are left out.
FAST_TESTS := tests/test_config.py tests/test_losses.py tests/test_models.py tests/test_features.py \
	tests/test_step.py tests/test_loader.py tests/test_metrics.py tests/test_infra.py tests/test_cluster_files.py \
	tests/test_security.py tests/test_stylize.py tests/test_shard.py tests/test_files.py tests/test_best.py \
	tests/test_tune.py tests/test_submit.py tests/test_demo.py tests/test_serve.py tests/test_raylogs.py tests/test_ray_sink.py \
	tests/test_bench_ddp.py tests/test_xdist.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not slow and not prometheus" --durations=5 $(FAST_TESTS) $(PYTEST_ARGS)

prometheus: $(STAMP)
	$(BIN)/python -m stylegen.cli prometheus

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
