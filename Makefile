# `make test` and `make demo` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

# The default model is the `tiny` preset (random weights) until a trained default ships.
demo: setup
	$(PY) sample.py prompt="a red circle moving left" steps=25 out=outputs/demo.mp4

clean:
	rm -rf $(VENV) outputs
