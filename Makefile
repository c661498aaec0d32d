# kdfast: two commands do all the set-up.
#   make demo   create the environment, build kdfast._C, run the main job (kdfast demo:
#               the QA distillation recipe on built-in data; DEMO_ARGS=--fresh starts over)
#   make test   same set-up, then ruff check (errors only) and every test tier (prints which ran / skipped)
#
# Variables: TORCH_SPEC (torch to install when the environment lacks one),
# VENV (default .venv; an active virtualenv is used as it is), MAX_JOBS.
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
MAX_JOBS ?= 2
export MAX_JOBS

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif

.PHONY: env build demo test test-fast bench bench-quick plot gpu-check info clean

$(PY):
	python3 -m venv $(VENV)

env: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -r requirements-dev.txt
	@$(PY) -c "import torch; print('torch', torch.__version__)"

# First time: an editable install of the package alone; then kdfast._C is
# built in place by ninja (only what changed is rebuilt). The compiler output
# goes to build/build.log (GCC 12 prints thousands of false-positive warnings
# from its own AVX-512 headers); its end is shown if the build fails.
build: env
	@$(PY) -m pip show -q kdfast >/dev/null 2>&1 || \
	  KDFAST_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build
	@echo "building kdfast._C (compiler output: build/build.log)"
	@$(PY) setup.py -q build_ext --inplace >build/build.log 2>&1 || \
	  { tail -n 60 build/build.log; echo "kdfast._C build failed: see build/build.log"; exit 1; }
	@$(PY) -m kdfast.info --short

DEMO_OUT ?= demo-output
DEMO_ARGS ?=
demo: build
	$(PY) -m kdfast demo --output_dir $(DEMO_OUT) $(DEMO_ARGS)

test: build
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest tests -q -rs -p no:cacheprovider

bench: build
	$(PY) bench/run_all.py

# The kernel benchmarks at small sizes (what make demo ran before the QA pipeline).
bench-quick: build
	$(PY) bench/run_all.py --quick

plot: env
	$(PY) bench/plot.py

# On a machine with a GPU (no network needed): build, CUDA tier, GPU benches.
# Writes logs and CSVs to GPU_OUT.
GPU_OUT ?= gpu-results
gpu-check:
	bash bench/gpu_check.sh $(GPU_OUT)

info: build
	$(PY) -m kdfast.info

clean:
	rm -rf build kdfast/_C*.so kdfast/_build_info.json *.egg-info demo-output
