# Everything a fresh machine needs: `make demo` and `make test` install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: anything asking for an unpinned torch would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train,dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	rm -rf demo
	$(BIN)/factory init --example demo
	$(BIN)/factory run evaluate -C demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/data_split.py --records 100000
	$(BIN)/python bench/data_split.py --records 1000000

docs: install
	$(BIN)/python scripts/update_readme_config.py

clean:
	rm -rf demo bench/out .pytest_cache
