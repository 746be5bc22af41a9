# dsmt — two commands do all the set-up: `make demo` and `make test`.
#
# .venv is bootstrapped from the project's own files (setup.py) and rebuilt
# when they change: dependencies when setup.py changes, the dsmt code itself
# (a regular, non-editable install, so twistd sees the dropin in
# twisted/plugins/) when any source file changes.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SOURCES := $(shell find setup.py transports server client twisted wsdl examples -type f \
             \( -name '*.py' -o -name '*.xsd' -o -name '*.wsdl' -o -name '*.xml' \) 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: demo test venv dev bench clean

demo: $(VENV)/.installed
	$(PY) examples/xyz1_demo.py

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) bench/psepr_throughput.py

# Development shortcut: `make dev` links the source folders under .dev/dsmt so
# `PYTHONPATH=.dev .venv/bin/python -m pytest tests/...` runs the working tree
# without reinstalling.  `make test` always runs the installed copy.
dev: $(VENV)/.installed
	mkdir -p .dev/dsmt
	for d in transports server client wsdl; do ln -sfn ../../$$d .dev/dsmt/$$d; done

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dsmt needs Python 3.11 (spyne 2.14 does not import on 3.12+)"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: setup.py | $(PY)
	$(PY) -m pip install -q "setuptools>=70" wheel
	$(PY) -m pip install -q ".[test]"
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	rm -rf build
	$(PY) -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	rm -rf build dsmt.egg-info
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

clean:
	rm -rf $(VENV) .dev build dsmt.egg-info .demo .pytest_cache
