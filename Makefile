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

demo: $(VENV)/.installed
	$(VENV)/bin/rmoe train tiny --out runs/demo
	$(VENV)/bin/rmoe eval runs/demo --split test
	$(VENV)/bin/rmoe generate runs/demo --prompt "def " --max-new-tokens 200 --out runs/demo/sample.txt
	@echo "demo run: runs/demo (model, tokenizer, metrics.jsonl, sample.txt)"

bench: $(VENV)/.installed
	$(VENV)/bin/rmoe bench all

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
