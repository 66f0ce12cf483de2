#!/usr/bin/env bash
# The ablations, from run_tiny.sh's SFT checkpoint (run that first), on a 300-question test split
# (100 per difficulty) that no training stage reads, over several RL seeds:
#   SFT alone | RL with over-turn masking | RL without it | RL straight from the base (no cold start)
# Each RL arm is trained once per seed and evaluated greedily at turn caps 1-16; ablation.py then
# prints one table (accuracy ± standard error, questions and seeds resampled), the differences that
# the paper claims, and draws runs/ablation/ablation.png.
# SEEDS="0 1 2" (default) takes about 60 minutes on 2 CPU cores (59 min 16 s, 2026-11-30); SEEDS="0" about 20.
# RL_FLAGS must match run_tiny.sh's RL stage, so that the masking arm is the tiny run's recipe.
# Rerunning it continues: an arm whose evaluation is already there is not trained again
# (FRESH=1 starts over).
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"0 1 2"}
RL_FLAGS=${RL_FLAGS:-"--steps 20 --questions 4 --group 8 --lr 2e-4 --precision bf16"}
A=runs/ablation
T0=$(date +%s)
[ "${FRESH:-0}" = 1 ] && rm -rf $A
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 ))s elapsed)"; }
[ -f runs/tiny/sft/model.safetensors ] || { echo "runs/tiny/sft is missing: run bash run_tiny.sh first"; exit 1; }

stage "test split: 300 questions, seed 2 (run_tiny.sh uses seed 1)"
[ -f $A/test/test.jsonl ] || python make_probe.py --out $A/test --n-train 0 --n-test 300 --seed 2
done_() { [ -f "$1/results.json" ]; }
evaluate() { python eval.py --model "$1" --data $A/test/test.jsonl --out "$2" --greedy --examples 2 --overwrite; }
# arm NAME SEED MODEL [rl flags]: train RL (--resume: a killed run continues, a finished one is kept)
# and evaluate it, unless its evaluation is there
arm() {
  done_ $A/eval_$1_s$2 && { echo "(eval_$1_s$2 is there)"; return; }
  stage "seed $2: $1"
  python rl.py --model "$3" --out $A/rl_$1_s$2 --seed $2 $RL_FLAGS --resume "${@:4}"   # a finished run is kept
  evaluate $A/rl_$1_s$2 $A/eval_$1_s$2
}

stage "SFT (cold start) alone"
done_ $A/eval_sft || evaluate runs/tiny/sft $A/eval_sft
for s in $SEEDS; do
  arm mask $s runs/tiny/sft                       # RL with over-turn masking (the tiny run's recipe)
  arm nomask $s runs/tiny/sft --no-overturn-mask  # RL without it
  arm nocold $s tiny-base                         # RL straight from the base, no cold start
done

stage "the table"
dirs() { local d=""; for s in $SEEDS; do d="$d${d:+,}$A/eval_$1_s$s"; done; echo "$d"; }
python ablation.py --out $A \
  --arm "SFT (cold start)=$A/eval_sft" \
  --arm "RL, masking=$(dirs mask)" \
  --arm "RL, no masking=$(dirs nomask)" \
  --arm "RL, no cold start=$(dirs nocold)" \
  --diff "RL, masking" "RL, no masking" \
  --diff "RL, masking" "SFT (cold start)" \
  --diff "RL, masking" "RL, no cold start"
echo; echo "done in $(( $(date +%s) - T0 ))s; plot: $A/ablation.png"
