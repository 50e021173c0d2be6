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

# The tests, then the four notebooks (nbmake), each in its fast size: the same experiments on fewer
# prompt/seed pairs and steps. One torch thread per process: two pytest workers share the two cores.
test: setup
	OMP_NUM_THREADS=1 MODELSCOPE_T2V_NOTEBOOK_FAST=1 $(PY) -m pytest -q -n 2 --dist loadfile tests notebooks --nbmake --nbmake-timeout=1200

# The bundled shapes model (modelscope_t2v/weights/shapes), the default sampler settings (DDIM, 50 steps).
demo: setup
	$(PY) sample.py prompt="a red circle moving left" seed=0 out=outputs/demo.mp4

clean:
	rm -rf $(VENV) outputs
