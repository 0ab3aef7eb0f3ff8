# multitalk — the two Quick start commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.multitalk-installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so nothing below can pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/multitalk demo --out outputs/demo.mp4

test: setup
	$(VENV)/bin/lint-imports --no-cache  # the layers contract in pyproject.toml
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
