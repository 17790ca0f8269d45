# The two commands of the README, and a few more.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET := -q --disable-pip-version-check

.PHONY: demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, pytest"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m launch.gan --flagfile=launch/configs/demo.flags --workdir=runs/demo
	@echo "Samples: runs/demo/samples.png (one grid per checkpoint in runs/demo/samples/)"
	@echo "Metrics: runs/demo/metrics.jsonl, losses: runs/demo/losses.png, checkpoints: runs/demo/checkpoints/"

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q --durations=15 tests

bench: $(VENV)/.installed
	$(PY) -m pip install $(PIP_QUIET) -e '.[bench]' 2>&1 | grep -v "^WARNING: Location" || true
	@echo "Baselines installed. Each benchmark is a script, run as python -m benchmarks.<name>;"
	@echo "benchmarks/README.md has one section per script, with its command, machine and results."

lint: $(VENV)/.installed
	$(PY) -m pip install $(PIP_QUIET) -e '.[lint]' 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
