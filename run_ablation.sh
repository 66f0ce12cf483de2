#!/usr/bin/env bash
# The ablations, from run_tiny.sh's SFT checkpoint (run that first), on a 300-question test split
# (100 per difficulty) that no training stage reads, over several RL seeds:
#   SFT alone | RL with over-turn masking | RL without it | RL straight from the base (no cold start)
# Each RL arm is trained once per seed and evaluated greedily at turn caps 1-16; ablation.py then
# prints one table (accuracy ± standard error, questions and seeds resampled), the differences that
# the paper claims, and draws runs/ablation/ablation.png.
# SEEDS="0 1 2" (default) takes about 75 minutes on 2 CPU cores; SEEDS="0" about 25.
# RL_FLAGS must match run_tiny.sh's RL stage, so that the masking arm is the tiny run's recipe.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"0 1 2"}
RL_FLAGS=${RL_FLAGS:-"--steps 20 --prompts 4 --group 8 --lr 2e-4"}
A=runs/ablation
T0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 ))s elapsed)"; }
[ -f runs/tiny/sft/model.safetensors ] || { echo "runs/tiny/sft is missing: run bash run_tiny.sh first"; exit 1; }

stage "test split: 300 questions, seed 2 (run_tiny.sh uses seed 1)"
python make_probe.py --out $A/test --n-train 0 --n-test 300 --seed 2
evaluate() { python eval.py --model "$1" --data $A/test/test.jsonl --out "$2" --greedy --examples 2 --overwrite; }

stage "SFT (cold start) alone"
evaluate runs/tiny/sft $A/eval_sft
for s in $SEEDS; do
  stage "seed $s: RL with over-turn masking"
  python rl.py --model runs/tiny/sft --out $A/rl_mask_s$s --seed $s $RL_FLAGS --overwrite
  evaluate $A/rl_mask_s$s $A/eval_mask_s$s
  stage "seed $s: RL without over-turn masking"
  python rl.py --model runs/tiny/sft --out $A/rl_nomask_s$s --seed $s $RL_FLAGS --no-overturn-mask --overwrite
  evaluate $A/rl_nomask_s$s $A/eval_nomask_s$s
  stage "seed $s: RL from the base, no cold start"
  python rl.py --model tiny-base --out $A/rl_nocold_s$s --seed $s $RL_FLAGS --overwrite
  evaluate $A/rl_nocold_s$s $A/eval_nocold_s$s
done

stage "the table"
arm() { local dirs=""; for s in $SEEDS; do dirs="$dirs${dirs:+,}$A/eval_$1_s$s"; done; echo "$dirs"; }
python ablation.py --out $A \
  --arm "SFT (cold start)=$A/eval_sft" \
  --arm "RL, masking=$(arm mask)" \
  --arm "RL, no masking=$(arm nomask)" \
  --arm "RL, no cold start=$(arm nocold)" \
  --diff "RL, masking" "RL, no masking" \
  --diff "RL, masking" "SFT (cold start)" \
  --diff "RL, masking" "RL, no cold start"
echo; echo "done in $(( $(date +%s) - T0 ))s; plot: $A/ablation.png"
