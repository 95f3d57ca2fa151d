# Everything a fresh machine needs: `make demo` and `make test` install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

DEMO_PORT ?= 8765

.PHONY: install browser demo test test-fast bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: anything asking for an unpinned torch would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python compiles from its sdist the first time (pip caches the wheel).
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e ".[train,gguf,trackers,dev]"
	# llama.cpp's GGUF converter and the example families' tokenizers (its vocabulary GGUFs), from the
	# same pinned sdist: nothing is fetched at run time.
	$(BIN)/factory setup-gguf
	# Bytecode for our own packages, as a regular pip install compiles them: an editable install
	# does not, and with PYTHONDONTWRITEBYTECODE set every `factory` command compiled them afresh
	# (a run with nothing to do: 0.53 s, against 0.30 s compiled). A source edited later is compiled in
	# memory, as before.
	$(BIN)/python -m compileall -q factory phases
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The dashboard comes up first (open the URL it prints) and stays up after the run, until Ctrl-C.
# A non-interactive shell starts background jobs deaf to Ctrl-C, hence the trap.
demo: install
	rm -rf demo && mkdir demo
	$(BIN)/factory serve -C demo --port $(DEMO_PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	$(BIN)/factory init --example demo && $(BIN)/factory run -C demo; \
	echo "The run has ended; the dashboard stays at http://127.0.0.1:$(DEMO_PORT)/ until Ctrl-C."; \
	wait $$server

# The dashboard test drives Debian's chromium through its own chromedriver: versions that match,
# and no browser download.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

# Two workers, each test file in one of them (its fixtures are built once), one torch thread
# each: the suite's servers, subprocesses and polls leave a core idle in one process.
TEST_WORKERS ?= 2

test: install browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/data_split.py --records 100000
	$(BIN)/python bench/data_split.py --records 1000000

docs: install
	$(BIN)/python scripts/update_readme_config.py

clean:
	rm -rf demo bench/out .pytest_cache
