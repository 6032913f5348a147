# rmoe — two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch 2.13.0 is installed where the package index has it; otherwise pip picks
# the newest release satisfying pyproject.toml (torch>=2.6).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install "$(TORCH_PIN)" || echo "note: $(TORCH_PIN) not available; using torch from pyproject.toml"
	$(PIP) install -e ".[test,tensorboard,eval]"
	touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -x --durations=15 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# Each `make demo` trains into a fresh folder (runs/demo-YYYYmmdd-HHMMSS; `make demo
# DEMO_OUT=DIR` to choose); runs/demo-latest points at the newest one. DEMO_ARGS adds training
# options, e.g. `make demo DEMO_ARGS="--set train.threads=1"`.
DEMO_OUT := runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_ARGS ?=

demo: $(VENV)/.installed
	$(VENV)/bin/rmoe train tiny --out $(DEMO_OUT) $(DEMO_ARGS)
	$(VENV)/bin/rmoe eval $(DEMO_OUT) --split test
	$(VENV)/bin/rmoe generate $(DEMO_OUT) --prompt "def " --max-new-tokens 200 --out $(DEMO_OUT)/sample.txt
	@mkdir -p runs && ln -sfn $(abspath $(DEMO_OUT)) runs/demo-latest 2>/dev/null || true
	@echo "demo run: $(DEMO_OUT) (model, tokenizer, metrics.jsonl, sample.txt); also runs/demo-latest"

bench: $(VENV)/.installed
	$(VENV)/bin/rmoe bench all

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
