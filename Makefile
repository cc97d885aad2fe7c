# The two commands a new machine needs (see README.md):
#   make serve   set up, build, and run `stipend serve` on the embedded default
#   make test    the whole test suite: formatting, lints, and every test
# Plus: make bench (the ledger benchmark; figures go in docs/benchmarks.md).

CARGO ?= cargo
# Extra arguments for `stipend serve`, e.g. make serve ARGS="--config stipend.toml"
ARGS ?=
TARGET := $(or $(CARGO_TARGET_DIR),target)
# The official OpenAI SDK for the end-to-end tests lives in a virtualenv beside the build, with
# the PyPI MCP server the agents tests run; the npm one lives in node_modules beside it.
PYENV := $(TARGET)/pyenv
MCP := $(TARGET)/mcp

.PHONY: serve test bench bench-agents bench-model bench-cache setup screenshots

setup:
	@scripts/setup.sh

serve: setup
	$(CARGO) build --release --locked -p stipend
	$(CARGO) run --release --locked -q -p stipend -- $(ARGS) serve

$(PYENV)/.installed: tests/sdk/requirements.txt
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
	touch $@

$(MCP)/.installed: tests/mcp/package.json tests/mcp/package-lock.json
	mkdir -p $(MCP)
	cp tests/mcp/package.json tests/mcp/package-lock.json $(MCP)/
	cd $(MCP) && npm ci --silent --no-audit --no-fund
	touch $@

# The embedded model's tests need the model: the freshly built binary fetches it (once).
test: setup $(PYENV)/.installed $(MCP)/.installed
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked --no-run
	$(TARGET)/debug/stipend model fetch --dir models
	STIPEND_PYTHON=$(abspath $(PYENV))/bin/python STIPEND_MCP_NODE_MODULES=$(abspath $(MCP))/node_modules \
		$(CARGO) test --workspace --locked

bench: setup
	$(CARGO) bench --locked -p stipend-ledger --bench ledger

# 10 000 agent runs at once: memory per waiting run, approval latency, steps/s (docs/benchmarks.md).
bench-agents: setup $(PYENV)/.installed
	STIPEND_PYTHON=$(abspath $(PYENV))/bin/python $(CARGO) bench --locked -p stipend-agents --bench runs

# The embedded model against a raw llama.cpp loop, 1/2/4/8 streams (docs/benchmarks.md).
bench-model: setup
	$(CARGO) build --locked -q -p stipend
	$(TARGET)/debug/stipend model fetch --dir models
	$(CARGO) bench --locked -p stipend --bench embedded

# The prefix cache against llama.cpp's llama-server built from the same llama.cpp (docs/benchmarks.md).
bench-cache: setup
	$(CARGO) build --locked -q -p stipend
	$(TARGET)/debug/stipend model fetch --dir models
	STIPEND_LLAMA_SERVER=$$(bench/llama-server.sh | tail -1) $(CARGO) bench --locked -p stipend --bench prefix_cache

# The web pages' screenshots in docs/screenshots/, taken by their browser tests (README shows them).
screenshots: setup
	STIPEND_SCREENSHOTS=1 $(CARGO) test --locked -p stipend --test web
