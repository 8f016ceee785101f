# fastkd: `make demo` and `make test` set everything up from nothing (a .venv with torch, the build
# tools and fastkd built against that torch); a second run only rebuilds what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

BUILD_INPUTS := pyproject.toml CMakeLists.txt $(shell find csrc cmake build_hooks -type f -not -path '*/__pycache__/*' 2>/dev/null)
BUILD_NOTE := Compiling fastkd's C++ (and, when CUDA is found, CUDA) extension against the installed torch: \
	this takes several minutes and prints nothing until it is done

.PHONY: install test demo bench lint clean wheel

install: $(VENV)/.fastkd-built

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: fastkd is built against the torch that is installed (no build isolation).
$(VENV)/.deps: | $(PY)
	$(PY) -m pip install -q torch numpy "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.26" ninja
	touch $@

$(VENV)/.fastkd-built: $(VENV)/.deps $(BUILD_INPUTS)
	@echo "$(BUILD_NOTE)."
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# What only the tests use: DeepSpeed ZeRO-3 on the CPU (the [deepspeed] extra; its C++ ops are not
# needed), PEFT students (LoRA, modules_to_save) in the fused-linear path, and TRL's trainer (the [trl]
# extra's range).
$(VENV)/.test-deps: $(VENV)/.deps
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed peft "trl>=1.16,<1.17"
	touch $@

test: install $(VENV)/.test-deps
	$(PY) -m pytest -q

demo: install
	$(PY) -m fastkd demo --out demo-output
	@echo "The fastkd command is in $(VENV)/bin: run $(VENV)/bin/fastkd --help, or source $(VENV)/bin/activate first."

bench: install
	$(PY) benchmarks/bench_loss.py

lint: install
	$(VENV)/bin/ruff check fastkd tests benchmarks build_hooks

# A wheel for chosen CUDA archs, e.g. `make wheel TORCH_CUDA_ARCH_LIST="8.0;9.0"`. Its own build
# folder, so switching archs does not rebuild the editable install's objects.
wheel: $(VENV)/.deps
	@echo "$(BUILD_NOTE)."
	$(PY) -m pip wheel --no-build-isolation --no-deps -C build-dir=build/wheel-{wheel_tag} -w dist .

clean:
	rm -rf build dist $(VENV)/.fastkd-built
