# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the default ensemble on the best device
#   make test   installs into .venv and runs the test suite (what CI runs)
# make gpu-check runs every GPU check with the machine's own python3 (no venv, no network).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.colocate-installed
# The exact CPU torch the project is tested with; pyproject.toml only sets a lower bound.
TORCH_PIN := torch==2.13.0

.PHONY: install demo test lint gpu-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[onnx,plot,dev]' nvidia-ml-py $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/colocate devices
	$(VENV)/bin/colocate demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check colocate tests
	$(VENV)/bin/mypy colocate

gpu-check:
	python3 scripts/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
