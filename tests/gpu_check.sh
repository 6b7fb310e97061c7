#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, every chapter's tiny preset with --device cuda
# (bf16 autocast) and --compile, 05's modern decoder in eager mode, a 1-process torchrun of 05, 100 steps
# of 05's gpt2-124m model, and that model with --parallel ddp and fsdp under torchrun (pydocs: no download).
# Prints a table of pass/fail, tokens/s, MFU and peak memory; exits 1 if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tests/bench.py --gpu "$@"
