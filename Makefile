# Scherzer — every target sets up .venv itself; a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
# Benchmarks live in their own environment: abTEM needs zarr 3, the test tools (rosettasciio's
# .zspy reader) need zarr 2, so the two cannot share one environment.
BVENV  := .venv-bench
BPY    := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.installed-bench
PYTEST_WORKERS ?= 2

.PHONY: demo test bench lint format clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BSTAMP): pyproject.toml
	$(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install --quiet --upgrade pip
	$(BPY) -m pip install --quiet -e '.[bench]'
	touch $(BSTAMP)

demo: $(STAMP)
	$(VENV)/bin/scherzer demo

test: $(STAMP) browser
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The web view's test drives a real headless Chromium through chromedriver (Debian's packages;
# browser downloads from elsewhere are not reachable). Installed here when missing and root.
browser:
	@if [ ! -x /usr/bin/chromedriver ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (Debian) for the web view test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; \
	fi

bench: $(BSTAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BPY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(BVENV) .pytest_cache build *.egg-info
