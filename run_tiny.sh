#!/usr/bin/env bash
# The whole tiny pipeline: the six stages in order, each reading the previous one's output under
# runs/tiny/, from the committed tiny base (checkpoints/tiny-base). Every stage runs with its own
# defaults, which are the recipe (a test checks it); the flags below only name what each reads
# and writes, for the eye. --overwrite: a rerun replaces the previous run's checkpoints and results.
# About 30 minutes on 2 CPU cores with bf16 compute (AVX-512 BF16 or AMX), an hour on 2 AVX2 cores.
# Ends by printing the report pages (open them in a browser).
set -euo pipefail
cd "$(dirname "$0")"
T0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 ))s elapsed)"; }

stage "0. synthetic Visual Probe data"
python make_probe.py --out runs/tiny/probe
stage "1. cold-start trajectories (the explorer and the hasty teacher)"
python collect.py --data runs/tiny/probe/train.jsonl --out runs/tiny/coldstart.jsonl
stage "2. supervised fine-tuning from the tiny base"
python sft.py --data runs/tiny/coldstart.jsonl --init tiny-base --out runs/tiny/sft --overwrite
stage "3. reinforcement learning (GRPO, over-turn masking, 6 turns)"
python rl.py --model runs/tiny/sft --data runs/tiny/probe/train.jsonl --out runs/tiny/rl --overwrite
stage "4. one search, played out"
python infer.py --model runs/tiny/rl --data runs/tiny/probe/test.jsonl --index 0
stage "5. evaluation: SFT and RL at turn caps 1-16 on the test split"
python eval.py --model runs/tiny/sft runs/tiny/rl --data runs/tiny/probe/test.jsonl --out runs/tiny/eval --overwrite
echo; echo "done in $(( $(date +%s) - T0 ))s"
echo "reports: runs/tiny/eval/sft/report.html runs/tiny/eval/rl/report.html runs/tiny/eval/compare.html"
