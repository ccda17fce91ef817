#!/usr/bin/env bash
# The offline demo: prepare SmolLM2-135M-Instruct + BANKING77 (with an out-of-scope "other" class),
# score the base model zero-shot, fine-tune it with LoRA, merge, score again, and compare.
# The demo owns runs/demo and runs/demo-base and replaces them on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

python scripts/prepare_demo.py
ftune eval configs/demo.yaml                 # zero-shot baseline -> runs/demo-base/eval/test/
ftune train configs/demo.yaml --overwrite    # LoRA fine-tune      -> runs/demo/
ftune merge runs/demo --overwrite            # merged checkpoint   -> runs/demo/merged/
ftune eval runs/demo                         # fine-tuned          -> runs/demo/eval/test/
ftune eval --compare runs/demo-base runs/demo
