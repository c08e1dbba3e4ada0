#!/usr/bin/env bash
# DiffMAS on GPQA-Diamond with Qwen3-8B (paper: 39.9 -> 60.1). See diffmas-qwen3-8b.sh.
TASK=gpqa_diamond exec bash "$(dirname "$0")/diffmas-qwen3-8b.sh" "$@"
