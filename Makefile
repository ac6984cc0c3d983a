# `make test` is the test command of the README and of CI.
CARGO ?= cargo
# The full MedQA / MMLU-Pro files beside the checkout, when they are there (tests/tasks.rs; the
# committed slices in tests/fixtures/data are tested either way).
export MEDRLVR_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: test test-wgpu check-no-avx512 check-cuda fmt clippy bench-kernels fixtures

# With Open MPI (or MPICH) and libclang installed (`.ci/run` installs them), the suite is built
# with the `mpi` feature and runs tests/mpi.rs (real `mpirun -n 2` jobs); without them, it is built
# without it. The feature adds only code behind `train --mpi`, so the other tests are the same.
MPI_FEATURE := $(if $(and $(shell command -v mpicc 2>/dev/null),$(shell ldconfig -p 2>/dev/null | grep -E -m1 'libclang(-[0-9.]+)?\.so')),--features med-rlvr/mpi,)

test:
	$(CARGO) test --release --workspace $(MPI_FEATURE)

# The backend-generic tests on wgpu (cubecl's GPU path), for CI on Mesa's software Vulkan
# (apt-get install mesa-vulkan-drivers) or on any Vulkan GPU. `make test` ran them on ndarray and flex.
# (tests/recompute.rs runs on ndarray and flex only: on wgpu, selfcheck compares kept and recomputed
# log-probs and every gradient through both against ndarray, which covers it; dropping it saved
# about 2 of CI's 40 minutes.)
WGPU_TESTS = --test selfcheck --test sampler --test checkpoint --test wgpu_binary
test-wgpu:
	$(CARGO) test --release --features wgpu $(WGPU_TESTS) -- wgpu::

# The release binary on an emulated CPU without AVX-512 (qemu-user's Haswell: AVX2 only): the
# default build carries burn-flex's AVX-512 kernels and must pick the others there. It runs the
# binary `make test` built (built here only when there is none: a `cargo build --release` after
# `make test` would relink it without the tests' fault-injection feature, 1.3 min in CI).
check-no-avx512:
	test -x $${CARGO_TARGET_DIR:-target}/release/med-rlvr || $(CARGO) build --release
	qemu-x86_64 -cpu Haswell $${CARGO_TARGET_DIR:-target}/release/med-rlvr selfcheck --cases 2 --seed 5

check-cuda:
	$(CARGO) check --release --features cuda

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Regenerate the transformers reference checkpoints (needs: pip install torch transformers safetensors tokenizers).
fixtures:
	python3 tests/fixtures/make_qwen2_fixtures.py
