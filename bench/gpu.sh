#!/usr/bin/env bash
# GPU checks, each under its own time limit so one slow part cannot eat the rest:
#   step_cost, fast_path   cost benchmarks at paper scale: random weights of a published shape
#                          (default Qwen3-8B), bf16, fixed-length decoding (outputs of random weights are
#                          meaningless; their costs are not), among them eager vs the compiled fast path
#                          (--compile auto) against the memory-bound floor (issue 14's GPU target);
#   tests_cuda             the tiny-model engine and training tests on CUDA (DIFFMAS_TEST_DEVICE=cuda);
#   inference_cost, training_step, batching, step_cost_b10   the other benchmarks at the same scale.
# With no step named after TAG it runs the default set (DEFAULT_STEPS: the target and the CUDA
# tests, about 8 minutes of limits, inside one 10-minute device command); `all` runs every step.
# Results: bench/results/<name>_<TAG>.json; summarise with `python bench/write_docs.py`.
#
#   bash bench/gpu.sh h100                              # TAG names the card; the default steps
#   bash bench/gpu.sh h100 inference_cost batching      # named steps only
#   MODEL=random:qwen3-4b TOKENIZER=path/to/tokenizer bash bench/gpu.sh h100 all
set -u
cd "$(dirname "$0")/.."
TAG=${1:-gpu}
shift || true
DEFAULT_STEPS="step_cost fast_path tests_cuda"
ALL_STEPS="step_cost step_cost_b10 fast_path inference_cost tests_cuda training_step batching"
STEPS=${*:-$DEFAULT_STEPS}
[ "$STEPS" = all ] && STEPS=$ALL_STEPS
for name in $STEPS; do
    case " $ALL_STEPS " in *" $name "*) ;; *) echo "gpu.sh: unknown step '$name' (steps: $ALL_STEPS, or all)" >&2; exit 2;; esac
done
MODEL=${MODEL:-random:qwen3-8b}
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
base=(--model "$MODEL" --dtype "$DTYPE" --device "$DEVICE")
[ -n "${TOKENIZER:-}" ] && base+=(--tokenizer "$TOKENIZER")
common=("${base[@]}" --tag "$TAG")

step() {  # step NAME SECONDS CMD...: run with a limit if NAME was asked for, report how it ended
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0;; esac
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
