# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install serve test lint train-text-tiny train-mol eval-text eval-molecules bench-text bench-molecules clean

install: $(STAMP)

# torch first, pinned, so the package's `torch>=` requirement is already met by the CPU wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps molsets==0.3.1  # MOSES data only; see pyproject's mol extra
	touch $(STAMP)

serve: install
	$(OFFLINE) $(BIN)/genserve serve $(ARGS)

test: install
	$(BIN)/ruff check .
	$(OFFLINE) $(BIN)/pytest $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

train-text-tiny: install
	$(BIN)/genserve train text-tiny $(ARGS)

train-mol: install
	$(BIN)/genserve train mol $(ARGS)
	$(BIN)/genserve train mol-vae $(ARGS)

eval-molecules: install
	$(OFFLINE) $(BIN)/genserve eval molecules $(ARGS)

eval-text: install
	$(OFFLINE) $(BIN)/genserve eval text $(ARGS)

# genserve against `transformers serve --continuous-batching` and sequential generate (docs/benchmarks.md).
bench-text: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(OFFLINE) $(BIN)/python benchmarks/text_serving.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
