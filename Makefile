# The two commands a new machine needs (see README.md):
#   make serve   set up, build, and run `stipend serve` on the embedded default
#   make test    the whole test suite: formatting, lints, and every test
# Plus: make bench (the ledger benchmark; figures go in docs/benchmarks.md).

CARGO ?= cargo
# Extra arguments for `stipend serve`, e.g. make serve ARGS="--config stipend.toml"
ARGS ?=

.PHONY: serve test bench setup

setup:
	@scripts/setup.sh

serve: setup
	$(CARGO) build --release --locked -p stipend
	$(CARGO) run --release --locked -q -p stipend -- $(ARGS) serve

test: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

bench: setup
	$(CARGO) bench --locked -p stipend-ledger --bench ledger
