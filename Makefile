# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch's wheels: CPU ones by default (as the Dockerfile's build argument), so a stock machine does not
# pull CUDA wheels; a GPU node passes TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, and an
# empty TORCH_INDEX_URL= uses only pip's own configuration.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-dev system-deps test-system-deps kubectl-deps serve test lint train-text-tiny train-mol train-music train-images \
        train-diffusion eval-text eval-molecules eval-music eval-images bench-text bench-molecules bench-audio \
        bench-images clean

# `make serve` installs what serving needs (the runtime dependencies); `make test` and the train, eval and
# bench targets add the dev extra (test tools, Triton, the training extras) on top of it.
install: system-deps $(STAMP)
install-dev: install $(DEV_STAMP)

# torch first, pinned and alone from its index (its own requirements come with the package's, from
# pip's usual index), so the package's `torch>=` requirement is already met by the CPU wheel. One retry:
# where the index cannot be reached (a mirror holds the wheel) pip's five retries wait about 8 s.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 1 --no-deps torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps molsets==0.3.1  # MOSES data only; see pyproject's mol extra
	touch $(DEV_STAMP)

# Debian packages the embedded models need: espeak-ng (genserve-speech), the Noto Color Emoji font
# (genserve-diffusion's training data) and locales, for the en_US.UTF-8 locale that hatesonar's ONNX
# text normaliser (the moderation classifier) constructs. Installed when missing and this user can
# (root with apt-get, as in CI and the Docker image); otherwise the command to run is printed.
SYSTEM_PACKAGES := espeak-ng fonts-noto-color-emoji locales
# What only the tests need: the browser the playground tests drive (tests/browser) and the Redis that
# gateway replicas share rate limits through (tests/e2e/test_keys.py); and a kubectl, whose built-in
# kustomize renders deploy/kubernetes (tests/deploy/test_kubernetes.py), Debian's only where no kubectl is
# on PATH (another package's, such as Google Cloud's, owns the same file). Where they cannot be
# installed, those tests are skipped and say why; everything else still runs.
TEST_SYSTEM_PACKAGES := chromium chromium-driver redis-server

# $(call apt_missing,PACKAGES,FAIL): installs the missing PACKAGES as root; otherwise prints the
# command and fails if FAIL is "fail", else only warns.
define apt_missing
	@if command -v dpkg >/dev/null; then \
		missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
				apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
					$(if $(filter warn,$(2)),|| echo "warning: could not install$$missing; the tests that need them are skipped" >&2); \
			elif [ "$(2)" = fail ]; then echo "missing:$$missing; install with: sudo apt-get install$$missing" >&2; exit 1; \
			else echo "warning: missing:$$missing (install with: sudo apt-get install$$missing); the tests that need them are skipped" >&2; fi; \
		fi; \
	elif [ "$(2)" = fail ] && ! command -v espeak-ng >/dev/null; then echo "install espeak-ng with your package manager" >&2; exit 1; fi
endef

system-deps:
	$(call apt_missing,$(SYSTEM_PACKAGES),fail)
	@if command -v locale-gen >/dev/null && ! locale -a 2>/dev/null | grep -qi '^en_US\.utf-\?8$$'; then \
		if [ "$$(id -u)" = 0 ]; then \
			sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen && locale-gen >/dev/null; \
		else echo "the en_US.UTF-8 locale is missing; generate it with: sudo locale-gen en_US.UTF-8" >&2; exit 1; fi; \
	fi

test-system-deps:
	$(call apt_missing,$(TEST_SYSTEM_PACKAGES),warn)
	@command -v kubectl >/dev/null || $(MAKE) --no-print-directory kubectl-deps

kubectl-deps:
	$(call apt_missing,kubernetes-client,warn)

# exec: genserve is make's child itself, so a signal meant for it reaches it alone, and its clean stop
# (exit 0) is what make sees.
serve: install
	exec env $(OFFLINE) $(BIN)/genserve serve $(ARGS)

# mypy reads its files and settings from pyproject.toml; its cache (.mypy_cache) makes reruns take seconds.
# It runs beside pytest (about 25 s from cold, on a core the tests leave idle much of the time), and
# either failing fails the target.
test: install-dev test-system-deps
	$(BIN)/ruff check .
	@$(BIN)/mypy > .mypy.out 2>&1 & mypy=$$!; \
	$(OFFLINE) $(BIN)/pytest $(ARGS); status=$$?; \
	wait $$mypy; typed=$$?; cat .mypy.out; rm -f .mypy.out; \
	[ $$status -eq 0 ] && [ $$typed -eq 0 ]

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

train-text-tiny: install-dev
	$(BIN)/genserve train text-tiny $(ARGS)

train-mol: install-dev
	$(BIN)/genserve train mol $(ARGS)
	$(BIN)/genserve train mol-vae $(ARGS)

train-music: install-dev
	$(BIN)/genserve train music $(ARGS)

# The digit classifier first: the others' FID uses its features.
train-images: install-dev
	$(BIN)/genserve train digits-classifier --minutes 1.5 --threads 1
	$(BIN)/genserve train vae --minutes 5 --threads 1
	$(BIN)/genserve train flow --minutes 5 --threads 1
	$(BIN)/genserve train gan --minutes 10 --threads 1

# genserve-diffusion as shipped: three stages on this 2-core CPU, each continuing from the last (the
# first two predicted the noise; see the model card), then the emoji classifier its eval reads.
DIFFUSION_STAGES := $(HOME)/.cache/genserve/diffusion/stages
train-diffusion: install-dev
	$(BIN)/genserve train diffusion --prediction-type epsilon --lr 1e-3 --minutes 34 --threads 1 \
		--out $(DIFFUSION_STAGES)/1
	$(BIN)/genserve train diffusion --prediction-type epsilon --lr 1e-3 --minutes 42 --threads 2 \
		--init-from $(DIFFUSION_STAGES)/1 --out $(DIFFUSION_STAGES)/2
	$(BIN)/genserve train diffusion --prediction-type v_prediction --lr 6e-4 --minutes 98 --threads 2 \
		--init-from $(DIFFUSION_STAGES)/2
	$(BIN)/genserve train emoji-classifier --minutes 3 --threads 1

eval-images: install-dev
	$(OFFLINE) $(BIN)/genserve eval images $(ARGS)

eval-music: install-dev
	$(OFFLINE) $(BIN)/genserve eval music $(ARGS)

eval-molecules: install-dev
	$(OFFLINE) $(BIN)/genserve eval molecules $(ARGS)

eval-text: install-dev
	$(OFFLINE) $(BIN)/genserve eval text $(ARGS)

# genserve against `transformers serve --continuous-batching` and sequential generate (docs/benchmarks.md).
bench-text: install-dev
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(OFFLINE) $(BIN)/python benchmarks/text_serving.py $(ARGS)

# Valid unique molecules/s against transformers generate, one at a time and batched.
bench-molecules: install-dev
	$(OFFLINE) $(BIN)/python benchmarks/molecule_serving.py $(ARGS)

# Images/s of the embedded diffusion model, batched and not (needs src/genserve/models/weights/genserve-diffusion).
bench-images: install-dev
	$(OFFLINE) $(BIN)/python benchmarks/image_serving.py $(ARGS)

# Real-time factor of speech and music, sequential and concurrent.
bench-audio: install-dev
	$(OFFLINE) $(BIN)/python benchmarks/audio_serving.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
