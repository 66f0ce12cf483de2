#!/usr/bin/env bash
# The ablations on a 300-question test split (100 per difficulty, seed 2) that no training stage
# reads, over several RL seeds, all from one SFT checkpoint:
#   SFT alone | RL with over-turn masking | RL without it | RL straight from the base (no cold start)
# Each RL arm is trained once per seed and evaluated greedily at turn caps 1-16; ablation.py then
# prints one table (accuracy ± standard error, questions and seeds resampled), the differences that
# the paper claims, and draws <out>/ablation.png. Run from anywhere: bash research/run_ablation.sh.
# Three regimes (run bash run_tiny.sh first):
#   REGIME=tiny (default): run_tiny.sh's SFT model and its RL recipe (20 steps, hard questions, T 0.7,
#     the whole model at lr 3e-5);
#     out: runs/ablation. SEEDS="0 1 2" (default) 1-2 hours on 2 CPU cores; SEEDS="0" 25-40 minutes.
#   REGIME=hard: the numbered-list experiment's (research/LOG.md): SFT on numbered-list trajectories (collect --thoughts
#     index-goal --slips 0.5, 400 steps with goal and look drills; made here if missing, about 25
#     minutes), then RL on hard questions only, 40 steps at temperature 0.7, where masking acts on
#     a third to a half of the rollouts; out: runs/ablation_hard. About 45 minutes a seed.
#   REGIME=long: the longer-SFT experiment's: REGIME=hard's SFT model (made if missing) trained 400 more
#     steps (a new schedule at lr 5e-4, data seed 1; about 25 minutes), then the same RL on hard
#     questions at lr 5e-5, between the 1e-4 that breaks this model and the 2e-5 that leaves it be;
#     out: runs/ablation_long. About 45 minutes a seed.
# RL_FLAGS overrides a regime's RL flags, ARMS its arms (tiny: "mask nomask nocold"; hard: "mask
# nomask", since the base never makes a tool call). Rerunning continues: an arm whose evaluation is
# already there is not trained again (FRESH=1 starts over in the regime's folder: REGIME=hard
# makes its SFT model again, REGIME=long its 400 more steps but not REGIME=hard's model).
# LANES=2 trains two arms at a time, each on half the cores, its output in <out>/lane0.log and
# lane1.log: on 2 cores more arms an hour than one arm on both, though not
# bit-identical to them (a float sum over 1 thread is not the sum over 2).
set -euo pipefail
cd "$(dirname "$0")/.."   # the project folder
SEEDS=${SEEDS:-"0 1 2"}
TEST=runs/ablation/test        # every regime: the same questions
REGIME=${REGIME:-tiny}
ON_HARD="--questions 4 --group 8 --levels hard --temperature 0.7 --precision best"   # every regime
case $REGIME in
  tiny) A=runs/ablation; SFT=runs/tiny/sft; DEFAULT_ARMS="mask nomask nocold"
        DEFAULT_RL="$ON_HARD --steps 20 --lr 3e-5 --train-modules all" ;;   # run_tiny.sh's RL
  hard) A=runs/ablation_hard; SFT=$A/sft; DEFAULT_ARMS="mask nomask"
        DEFAULT_RL="$ON_HARD --steps 40 --lr 1e-4 --train-modules all" ;;
  long) A=runs/ablation_long; SFT=$A/sft; DEFAULT_ARMS="mask nomask"
        DEFAULT_RL="$ON_HARD --steps 40 --lr 5e-5 --train-modules all" ;;
  *) echo "REGIME must be tiny, hard or long, not '$REGIME'"; exit 1 ;;
esac
RL_FLAGS=${RL_FLAGS:-$DEFAULT_RL}
ARMS=${ARMS:-$DEFAULT_ARMS}
for a in $ARMS; do [[ $a =~ ^(mask|nomask|nocold)$ ]] || { echo "ARMS: unknown arm '$a' (mask, nomask, nocold)"; exit 1; }; done
LANES=${LANES:-1}
[[ $LANES =~ ^[1-9][0-9]*$ ]] || { echo "LANES must be a whole number of 1 or more, not '$LANES'"; exit 1; }
T0=$(date +%s)
[ "${FRESH:-0}" = 1 ] && rm -rf $A
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 ))s elapsed)"; }
[ -f runs/tiny/probe/train.jsonl ] || { echo "runs/tiny/probe is missing: run bash run_tiny.sh first"; exit 1; }

stage "test split: 300 questions, seed 2 (run_tiny.sh uses seed 1)"
[ -f $TEST/test.jsonl ] || python make_probe.py --out $TEST --n-train 0 --n-test 300 --seed 2
NUMBERED=runs/ablation_hard      # REGIME=hard's trajectories and SFT model, which REGIME=long goes on from
DRILLS="--verdict-drills 8 --verdict-style goal --drill-weight 0.5 --look-drills 8 --precision best"
if [ ! -f $SFT/model.safetensors ]; then
  [ "$REGIME" = tiny ] && { echo "$SFT is missing: run bash run_tiny.sh first"; exit 1; }
  if [ ! -f $NUMBERED/sft/model.safetensors ]; then
    stage "SFT on numbered-list trajectories"
    python collect.py --data runs/tiny/probe/train.jsonl --out $NUMBERED/coldstart.jsonl --thoughts index-goal --slips 0.5 --hasty 0
    python sft.py --data $NUMBERED/coldstart.jsonl --init tiny-base --out $NUMBERED/sft --steps 400 --batch 8 --lr 1e-3 \
      $DRILLS --overwrite
  fi
  if [ "$REGIME" = long ]; then
    stage "400 more SFT steps on the same trajectories"
    python sft.py --data $NUMBERED/coldstart.jsonl --init $NUMBERED/sft --out $SFT --steps 400 --batch 8 --lr 5e-4 \
      --seed 1 $DRILLS --overwrite
  fi
fi
done_() { [ -f "$1/results.json" ]; }
evaluate() { python eval.py --model "$1" --data $TEST/test.jsonl --out "$2" --greedy --examples 2 --overwrite; }
# arm NAME SEED MODEL [rl flags]: train RL (--resume: a killed run continues, a finished one is kept)
# and evaluate it, unless its evaluation is there
arm() {
  done_ $A/eval_$1_s$2 && { echo "(eval_$1_s$2 is there)"; return; }
  stage "seed $2: $1"
  python rl.py --model "$3" --out $A/rl_$1_s$2 --seed $2 $RL_FLAGS --resume "${@:4}"   # a finished run is kept
  evaluate $A/rl_$1_s$2 $A/eval_$1_s$2
}

stage "SFT (cold start) alone"
done_ $A/eval_sft || evaluate $SFT $A/eval_sft
one() {   # one ARM SEED
  case $1 in
    mask) arm mask $2 $SFT ;;                             # RL with over-turn masking (the tiny run's recipe)
    nomask) arm nomask $2 $SFT --no-overturn-mask ;;      # RL without it
    nocold) arm nocold $2 tiny-base ;;                    # RL straight from the base, no cold start
  esac
}
todo=(); for s in $SEEDS; do for a in $ARMS; do todo+=("$a $s"); done; done
lane() { local i; for ((i = $1; i < ${#todo[@]}; i += LANES)); do one ${todo[i]}; done; }
if [ "$LANES" = 1 ]; then
  lane 0
else   # LANES arms at a time, each on its share of the cores, each lane's output in its own log
  export OMP_NUM_THREADS=$(( $(nproc) / LANES > 1 ? $(nproc) / LANES : 1 ))
  stage "$LANES lanes of $OMP_NUM_THREADS thread(s): ${todo[*]}; output in $A/lane*.log"
  pids=(); for ((l = 0; l < LANES; l++)); do lane $l > $A/lane$l.log 2>&1 & pids+=($!); done
  failed=0; for p in "${pids[@]}"; do wait $p || failed=1; done
  [ $failed = 0 ] || { echo "a lane failed: see the end of $A/lane*.log"; exit 1; }
fi

stage "the table"
dirs() { local d=""; for s in $SEEDS; do d="$d${d:+,}$A/eval_$1_s$s"; done; echo "$d"; }
has() { [[ " $ARMS " == *" $1 "* ]]; }
name() { case $1 in mask) echo "RL, masking" ;; nomask) echo "RL, no masking" ;; nocold) echo "RL, no cold start" ;; esac; }
args=(--out $A --arm "SFT (cold start)=$A/eval_sft")
for a in $ARMS; do args+=(--arm "$(name $a)=$(dirs $a)"); done
has mask && has nomask && args+=(--diff "RL, masking" "RL, no masking")
has mask && args+=(--diff "RL, masking" "SFT (cold start)")
has mask && has nocold && args+=(--diff "RL, masking" "RL, no cold start")
python -m research.ablation "${args[@]}"
echo; echo "done in $(( $(date +%s) - T0 ))s; plot: $A/ablation.png"
