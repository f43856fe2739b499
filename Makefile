# Two commands do all setup on a fresh machine (see README):
#   make demo   - create .venv, install, fetch real offline assets, run the SmolLM2 demo
#   make test   - create .venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[demo,test]"
	touch $@

demo: install
	$(VENV)/bin/moonshot demo

test: install
	$(PY) -m pytest -ra
