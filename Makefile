# The README's commands. Everything installs into .venv; nothing is assumed but python3 and cargo.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DIST   := dist
TOY    ?= runs/toy

.PHONY: demo test bench wheel install lint rust-test kernel-check py-test gpu-check clean

$(BIN)/maturin:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.5,<2"

# One abi3 wheel (CPython >= 3.10) with the Rust core and the CUDA sources inside.
wheel: $(BIN)/maturin
	rm -f $(DIST)/autoguide_fast-*.whl
	$(BIN)/maturin build --release --quiet --out $(DIST)

# Installs the wheel (not the source tree) with its runtime and test dependencies.
install: wheel
	$(BIN)/python -m pip install --quiet "$$(ls $(DIST)/autoguide_fast-*.whl)[test]"
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(DIST)/autoguide_fast-*.whl

demo: install
	$(BIN)/autoguide toy --out $(TOY)

lint: install
	cd rust && cargo fmt --all --check
	cd rust && cargo clippy --workspace --all-targets -- -D warnings
	$(BIN)/ruff check python tests benchmarks scripts examples
	$(BIN)/ruff format --check python tests benchmarks scripts examples

rust-test:
	cd rust && cargo test --workspace

kernel-check: install
	$(BIN)/python -m autoguide_fast.kernels --check
	$(BIN)/python scripts/emulate_attention_tc.py

py-test: install
	$(BIN)/python -m pytest tests

test: install lint rust-test kernel-check py-test

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-enable --benchmark-only \
		--benchmark-json=$(DIST)/bench.json -p no:cacheprovider -s

# On a machine with an NVIDIA GPU and no Rust (docs/gpu-check.md): installs the wheel from dist/ (built
# here with `make wheel`, then sent along) into a temporary folder, runs the GPU tests, benchmarks and
# compute-sanitizer stage by stage within GPU_CHECK_BUDGET_S (360 s), and writes report.md,
# report.json and gpu_check.log to $$OUT (else gpu-report/). Without a GPU it stops, and says so,
# where the GPU stages begin. GPU_CHECK_STAGES=sanitizer,bench-e2e reruns some stages only.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(DIST) rust/target .pytest_cache .ruff_cache
