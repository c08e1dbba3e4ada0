#!/usr/bin/env bash
# DiffMAS paper setting (shared by the per-benchmark scripts beside it): Qwen3-8B, 4 agents (Planner -> Critic -> Refiner -> Solver), m=10,
# LoRA r=8 alpha=16 on q/k/v/o, AdamW lr 5e-5, cosine, gradient accumulation 64, evaluation
# with sampling T=0.6 top-p 0.95. Reported: AIME24 50.0 -> 76.7, GPQA-Diamond 39.9 -> 60.1.
# Usage: TASK=aime24|gpqa_diamond TRAIN_TASK=... bash diffmas-qwen3-8b.sh
#
# Needs GPUs with hub access (or a local copy of Qwen/Qwen3-8B) and training problems with
# worked solutions: TRAIN_TASK is any diffmas task with a train split, or a JSONL of your own
# (jsonl:PATH?type=math&question=problem&answer=answer&target=solution); teacher traces can be
# given with --targets FILE ({"id", "target"} per line). The paper's exact training data is not
# distributed with diffmas.
set -euo pipefail
TASK=${TASK:?set TASK=aime24 or TASK=gpqa_diamond}
MODEL=${MODEL:-Qwen/Qwen3-8B}
TRAIN_TASK=${TRAIN_TASK:?set TRAIN_TASK, e.g. "jsonl:data/math_train.jsonl?type=math&question=problem"}
NGPU=${NGPU:-8}
OUT=${OUT:-adapters/qwen3-8b-diffmas-m10}
# Qwen3's chat template thinks by default; CHAT_KWARGS='{"enable_thinking": false}' switches it off.
# The same value goes to training and every evaluation (an adapter should be read as it was trained).
CHAT=(${CHAT_KWARGS:+--chat-template-kwargs "$CHAT_KWARGS"})
# GPQA-Diamond: put the official password-protected dataset.zip in --data-dir or $DIFFMAS_DATA_DIR;
# it is unpacked into the user cache at run time, never into the repository.

# Qwen3 reasoning models: bf16 on GPU (dtype auto), long targets.
accelerate launch --multi_gpu --num_processes "$NGPU" -m diffmas train \
  --task "$TRAIN_TASK" --method diffmas --model "$MODEL" --out "$OUT" "${CHAT[@]}" \
  --latent-steps 10 --adapters shared --upstream-grad full \
  --lora-r 8 --lora-alpha 16 --target-modules q_proj,k_proj,v_proj,o_proj \
  --lr 5e-5 --batch-size 1 --grad-accum $((64 / NGPU)) --epochs 1 --max-target-tokens 4096 --save-steps 50

# Evaluation: the baseline and the trained channel, k=4 samples (self-consistency), sharded over GPUs.
for METHOD in single text_mas latent_mas; do
  accelerate launch --multi_gpu --num_processes "$NGPU" -m diffmas eval --task "$TASK" --method "$METHOD" \
    --model "$MODEL" "${CHAT[@]}" --latent-steps 10 --samples 4 --temperature 0.6 --top-p 0.95 \
    --max-new-tokens 16384 --batch-size 4 --out "runs/qwen3-8b-$TASK-$METHOD"
done
accelerate launch --multi_gpu --num_processes "$NGPU" -m diffmas eval --task "$TASK" --method diffmas \
  --adapter "$OUT" --model "$MODEL" "${CHAT[@]}" --latent-steps 10 --samples 4 --temperature 0.6 --top-p 0.95 \
  --max-new-tokens 16384 --batch-size 4 --out "runs/qwen3-8b-$TASK-diffmas"
diffmas compare runs/qwen3-8b-"$TASK"-{single,text_mas,latent_mas,diffmas}
diffmas report runs/qwen3-8b-"$TASK"-* --out "runs/qwen3-8b-$TASK-report"
