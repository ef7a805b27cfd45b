# Verge — one-command set-up. `make demo` and `make test` install into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test lint bench bench-zipf clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Command-line tools the integration tests drive (curl). Installed only when missing.
system-deps:
	@command -v curl >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl)

demo: install
	$(BIN)/verge demo

test: install system-deps
	$(BIN)/ruff check verge tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check verge tests bench

bench: install
	bash bench/setup.sh
	$(BIN)/python bench/run.py

bench-zipf: install
	$(BIN)/python bench/zipf_hit_ratio.py

clean:
	rm -rf $(VENV) .demo .pytest_cache *.egg-info
