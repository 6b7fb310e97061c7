#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, every chapter's tiny preset with --device cuda
# (bf16 autocast) and --compile, a 1-process torchrun of 05, and 200 steps of 05's gpt2-124m preset.
# Prints a table of pass/fail, tokens/s, MFU and peak memory; exits 1 if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tests/bench.py --gpu "$@"
