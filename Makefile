# Two commands on a fresh machine: `make demo` and `make test`.
# Both create or update the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HC := $(VENV)/bin/hybridconv
DEMO_OUT := demo-out

.PHONY: demo test venv install install-reference install-test system-blas torch clean

# torch, for the reference side (verify) and the tests, pinned in pyproject.toml's
# extras. PyPI's torch for Linux x86-64 is the CUDA build: torch 2.13.0 pulls
# nvidia-* and triton wheels of several GB. On Linux without an NVIDIA driver (no
# nvidia-smi) torch is installed first from the PyTorch CPU index alone
# (2.13.0+cpu, no CUDA libraries); the extras' torch==2.13.0 is then already
# satisfied. Elsewhere (macOS: PyPI's build is the CPU/MPS one; Linux with an
# NVIDIA driver: the CUDA build is wanted) pip installs PyPI's. Override with
# `make test TORCH_INDEX=URL` (e.g. https://download.pytorch.org/whl/cu126) or
# `TORCH_INDEX=` (PyPI, whatever the machine).
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then echo $(TORCH_CPU_INDEX); fi)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# An optimised BLAS for MLX's CPU backend (see hybridconv/blas.py): the mlx[cpu]
# wheel bundles the reference BLAS (float32 products ~50x slower). On Linux, as
# root with apt-get, this installs the system OpenBLAS; elsewhere it prints what
# to do. Never required: without it everything works, slower (`hybridconv doctor`).
system-blas:
	@if [ "$$(uname -s)" = Linux ] && ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libopenblas[p]*\.so\.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
	      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; }; } \
	      && echo "installed libopenblas0-pthread: fast float32 products for MLX" \
	      || echo "note: could not install libopenblas0-pthread; MLX uses its slow bundled BLAS (see hybridconv doctor)"; \
	  else \
	    echo "note: no system OpenBLAS; MLX uses its slow bundled BLAS. Install it (Debian/Ubuntu: apt-get install libopenblas0-pthread)"; \
	  fi; \
	fi

install: venv system-blas
	$(PIP) install --quiet -e .

torch: venv
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"

install-reference: venv system-blas torch
	$(PIP) install --quiet -e ".[reference]"

install-test: venv system-blas torch
	$(PIP) install --quiet -e ".[test]"

# The demo needs the reference side (torch, transformers) for verify.
demo: install-reference
	rm -rf $(DEMO_OUT)
	@echo "== inspect: what conversion will do (reads config.json + safetensors headers only)"
	$(HC) inspect examples/checkpoints/plamo2-tiny
	@echo "== convert PLaMo-2 and RecurrentGemma"
	$(HC) convert examples/checkpoints/plamo2-tiny -o $(DEMO_OUT)/plamo2-tiny --dtype float32
	$(HC) convert examples/checkpoints/recurrent_gemma-tiny -o $(DEMO_OUT)/recurrent_gemma-tiny --dtype bfloat16
	@echo "== inspect the converted folder (converting it again would change nothing)"
	$(HC) inspect $(DEMO_OUT)/recurrent_gemma-tiny
	@echo "== verify against the PyTorch reference (writes verification.json into the folder)"
	$(HC) verify $(DEMO_OUT)/plamo2-tiny --reference examples/checkpoints/plamo2-tiny
	$(HC) reference examples/checkpoints/recurrent_gemma-tiny -o $(DEMO_OUT)/rg-reference.safetensors --hidden-states
	$(HC) verify $(DEMO_OUT)/recurrent_gemma-tiny --reference-logits $(DEMO_OUT)/rg-reference.safetensors
	@echo "== quantize 4-bit (SSM/RG-LRU dynamics stay float32; conv kernels and norms keep the output dtype), then verify"
	$(HC) quantize examples/checkpoints/plamo2-tiny -o $(DEMO_OUT)/plamo2-tiny-4bit --bits 4 --group-size 32
	$(HC) verify $(DEMO_OUT)/plamo2-tiny-4bit --reference examples/checkpoints/plamo2-tiny
	@echo "== load in hybridconv and in mlx-lm"
	$(PY) scripts/demo_load.py $(DEMO_OUT)/plamo2-tiny $(DEMO_OUT)/recurrent_gemma-tiny $(DEMO_OUT)/plamo2-tiny-4bit
	@echo "== Bamba and Zamba2: mlx-lm has no such models, so the outputs carry hybridconv's (hybridconv_model.py)"
	$(HC) convert examples/checkpoints/bamba-tiny -o $(DEMO_OUT)/bamba-tiny --dtype float32
	$(HC) convert examples/checkpoints/zamba2-tiny -o $(DEMO_OUT)/zamba2-tiny --dtype float32
	$(PY) -m mlx_lm generate --model $(DEMO_OUT)/bamba-tiny --trust-remote-code --prompt "hello world" --max-tokens 8 --ignore-chat-template
	$(PY) -m mlx_lm generate --model $(DEMO_OUT)/zamba2-tiny --trust-remote-code --prompt "one two three" --max-tokens 8 --ignore-chat-template
	@echo "== upload (dry run): what would be published, and the model card"
	$(HC) upload $(DEMO_OUT)/plamo2-tiny-4bit --repo-id demo-org/plamo2-tiny-mlx-4bit --dry-run
	@echo "== release plan (dry run): three variants, one reference run, verify before upload"
	$(HC) release examples/demo-release.toml --dry-run

# two worker processes, one test file each at a time (module-scoped conversions stay
# shared within a file); TEST_WORKERS=0 runs everything in this process
TEST_WORKERS ?= 2
test: install-test
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
