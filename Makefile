# Quick start: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned first so that no CUDA build is pulled in by a range.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,train,export,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m neoxja demo

test: $(STAMP)
	$(PY) -m pytest -q

# every benchmark runs; the target fails at the end if any of them reported a missed goal
bench: $(STAMP)
	status=0; for b in benchmarks/bench_*.py; do $(PY) $$b || { echo "$$b: a goal was missed"; status=1; }; done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
