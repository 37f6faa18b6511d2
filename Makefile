# bertxml: `make demo` runs the main job end to end on the embedded default; `make test` runs the tests.
PY      := .venv/bin/python
WORKDIR ?= warehouse
STAMP   := .venv/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[local,dev]"
	$(PY) -m bertxml.platform.jars          # Delta Lake's jars from Maven Central, cached for offline runs
	touch $(STAMP)

demo: install
	.venv/bin/bertxml demo --workdir $(WORKDIR) --conf conf/local.yaml

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/etl.py

clean:
	rm -rf $(WORKDIR) .pytest_cache
