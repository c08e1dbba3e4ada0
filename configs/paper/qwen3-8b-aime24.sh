#!/usr/bin/env bash
# DiffMAS on AIME24 with Qwen3-8B (paper: 50.0 -> 76.7). See diffmas-qwen3-8b.sh.
TASK=aime24 exec bash "$(dirname "$0")/diffmas-qwen3-8b.sh" "$@"
