# `make test` is the test command of the README and of CI.
CARGO ?= cargo
export MEDRLVR_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: test check-cuda fmt clippy bench-kernels fixtures

test:
	$(CARGO) test --release --workspace

check-cuda:
	$(CARGO) check --release --features cuda

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Regenerate the transformers reference checkpoints (needs: pip install torch transformers safetensors tokenizers).
fixtures:
	python3 tests/fixtures/make_qwen2_fixtures.py
