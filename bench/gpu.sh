#!/usr/bin/env bash
# GPU checks, in order of value, each under its own time limit so one slow part cannot eat the rest:
#   1. cost benchmarks at paper scale: random weights of a published shape (default Qwen3-8B), bf16,
#      fixed-length decoding (outputs of random weights are meaningless; their costs are not),
#      among them eager vs the compiled fast path (--compile auto) against the memory-bound floor;
#   2. the tiny-model engine and training tests on CUDA (DIFFMAS_TEST_DEVICE=cuda);
#   3. the training-step and batching benchmarks at the same scale.
# Results: bench/results/<name>_<TAG>.json; summarise with `python bench/write_docs.py`.
#
#   bash bench/gpu.sh h100            # TAG names the card
#   MODEL=random:qwen3-4b TOKENIZER=path/to/tokenizer bash bench/gpu.sh h100
set -u
cd "$(dirname "$0")/.."
TAG=${1:-gpu}
MODEL=${MODEL:-random:qwen3-8b}
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
base=(--model "$MODEL" --dtype "$DTYPE" --device "$DEVICE")
[ -n "${TOKENIZER:-}" ] && base+=(--tokenizer "$TOKENIZER")
common=("${base[@]}" --tag "$TAG")

step() {  # step NAME SECONDS CMD...: run with a limit, report how it ended
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start))s"
}

"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
step step_cost 60 "$PY" bench/step_cost.py "${common[@]}"
step step_cost_b10 60 "$PY" bench/step_cost.py "${base[@]}" --tag "${TAG}_b10" --batch 10 --repeats 3
step fast_path 240 "$PY" bench/fast_path.py "${common[@]}" --lengths 300,1200,4800 --batches 1 --repeats 2
step inference_cost 150 "$PY" bench/inference_cost.py "${common[@]}" --n 10 --batch-size 10 \
    --max-new-tokens 64 --upstream-max-new-tokens 64
step tests_cuda 180 env DIFFMAS_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_trace.py tests/test_methods.py tests/test_realign.py tests/test_train.py tests/test_fast_path.py \
    -k "not two_process and not torchrun and not accelerate"
step training_step 240 "$PY" bench/training_step.py "${common[@]}" --sizes 1 --repeats 2
step batching 120 "$PY" bench/batching.py "${common[@]}" --max-new-tokens 64
