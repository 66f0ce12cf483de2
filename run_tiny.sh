#!/usr/bin/env bash
# The whole tiny pipeline, stage by stage, each reading the previous one's output under runs/tiny/.
# Starts from the committed tiny base (checkpoints/tiny-base). 20-32 minutes on 2 CPU cores with
# AVX-512 BF16 or AMX (--precision best computes in bf16 there; NOTES.md sections 21 and 29: 20:28 on an
# AMX Xeon, 31:48 on an AVX-512 BF16 EPYC), depending on the CPU; over an hour on
# 2 AVX2-only cores (float32: bf16 is emulated there, several times slower; see the README).
# SFT takes small batches (4) for many steps (800): the same data and cost as 8 x 400, twice the
# updates, and twice the accuracy on hard (NOTES.md section 21). RL trains on hard questions only,
# at temperature 0.7: on every level RL turns the hard search into a one-zoom guess (sections 19, 21).
# RL trains the last MLP alone (--train-modules layers.3.mlp), the part of the model with the least
# gradient noise: RL of the whole model walks all its weights and lowers the SFT model's accuracy
# (sections 16, 23-24, 29); the last MLP alone holds it, and its backward stops at the last layer.
# --overwrite: a rerun replaces the previous run's checkpoints and results (without it they are refused).
# Ends by printing the paths of the report pages (open them in a browser).
set -euo pipefail
cd "$(dirname "$0")"
T0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 ))s elapsed)"; }

stage "0. synthetic Visual Probe data"
python make_probe.py --out runs/tiny/probe --n-train 2400 --n-test 300 --seed 1
stage "1. cold-start trajectories (explorer teacher)"
python collect.py --data runs/tiny/probe/train.jsonl --out runs/tiny/coldstart.jsonl --thoughts chain-compare
stage "2. supervised fine-tuning from the tiny base"
python sft.py --data runs/tiny/coldstart.jsonl --init tiny-base --out runs/tiny/sft --steps 800 --batch 4 --lr 1e-3 \
  --verdict-drills 4 --verdict-style compare --drill-weight 0.5 --precision best --overwrite
stage "3. reinforcement learning (GRPO, over-turn masking, 6 turns)"
python rl.py --model runs/tiny/sft --data runs/tiny/probe/train.jsonl --out runs/tiny/rl --steps 20 --questions 4 --group 8 \
  --levels hard --temperature 0.7 --lr 1e-4 --train-modules layers.3.mlp --precision best --overwrite
stage "4. evaluation: turn caps 1-16 on the test split"
python eval.py --model runs/tiny/sft --data runs/tiny/probe/test.jsonl --out runs/tiny/eval_sft --greedy --overwrite
python eval.py --model runs/tiny/rl --data runs/tiny/probe/test.jsonl --out runs/tiny/eval_rl --greedy --overwrite
python eval.py --compare runs/tiny/eval_sft runs/tiny/eval_rl --out runs/tiny/compare.png
echo; echo "done in $(( $(date +%s) - T0 ))s"
echo "report of the RL model: runs/tiny/eval_rl/report.html"
echo "comparison: runs/tiny/compare.html"
