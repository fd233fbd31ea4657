# make demo · make test · make lint · make bench — each creates .venv when it is missing.
# make lint: ruff (style) and mypy (types); CI runs it before make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is tested with; the machine's pip serves it from local files.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-runs

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cfexplain.train +dataset=knee $(ARGS)
	$(PY) -m cfexplain.evaluate run=runs/knee
	$(PY) -m cfexplain.explain run=runs/knee limit=16 reports=[0]

test: $(STAMP)
	@# The gallery's browser test drives Debian's chromium; as root, install it when missing.
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium; fi
	WANDB_MODE=offline $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check cfexplain tests benchmarks
	$(PY) -m ruff format --check cfexplain tests benchmarks
	@# Type check of cfexplain on the baseline in pyproject.toml [tool.mypy].
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks

clean-runs:
	rm -rf runs
