#!/usr/bin/env bash
# The checks a session lent one GPU runs in one go, writing everything to $OUT
# (default runs/gpu_check): about 8 minutes on an H200 once the machine is up.
#   1. the decode window (minio3/engine/runner.py: CUDA graphs when flash-attn is installed) against the eager
#      engine, tiny base in bf16 on the GPU: share of trajectories that agree token for token
#   2. tools/bench.py --gpu-only: a 7B-shaped random model, decode at batch 1/16/64, roofline fraction
#   3. a 3B-shaped random model (this project's tiny tokenizer, so no 151k-word embeddings)
#      through sft.py and rl.py in bf16 with gradient checkpointing: memory and step time (logs)
# SHAPE=tiny runs the same steps with the tiny model (a dry run of the script on the CPU).
# The machine's transformers must be >= 5.24 (requirements.txt); install a wheel first if not.
set -uo pipefail
cd "$(dirname "$0")/.."   # the project folder (run: bash tools/gpu_check.sh)
OUT=${OUT:-runs/gpu_check}
SHAPE=${SHAPE:-3b}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.txt"; }

log "1. decode windows vs eager"
python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/windows.txt"
import sys, numpy as np, torch
from minio3.engine import Engine, Sample
from minio3.model import load
from minio3.world import probe_sample
dev = "cuda" if torch.cuda.is_available() else "cpu"
model, proc = load("tiny-base", device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
scenes = [probe_sample(np.random.default_rng([9, i]), "medium") for i in range(16)]
samples = [Sample(img, f["problem"]) for img, f, _ in scenes]
runs = {k: Engine(model, proc, max_batch=8).run(samples, greedy=True, max_turns=4, max_turn_tokens=64,
                                                window=k, progress=False) for k in (1, 8)}
same = sum(a.token_ids == b.token_ids for a, b in zip(runs[1], runs[8]))
eng = Engine(model, proc, max_batch=8)
eng.run(samples[:2], greedy=True, max_turns=1, max_turn_tokens=16, window=8, progress=False)
print(f"device {dev}, flash {eng.decoder.use_flash}, graphs {eng.runner.use_graphs if eng.runner else None}: "
      f"{same} of {len(samples)} trajectories identical with windows of 8")
EOF

log "2. the engine benchmark"
python -m tools.bench --gpu-only --repeats 3 2>&1 | tail -8 | tee "$OUT/bench.txt"

log "3. a ${SHAPE}-shaped model through sft.py and rl.py"
python make_probe.py --out "$OUT/probe" --n-train 40 --n-test 0 --seed 5 > "$OUT/probe.log" 2>&1
python collect.py --data "$OUT/probe/train.jsonl" --out "$OUT/cs.jsonl" > "$OUT/collect.log" 2>&1
python - "$OUT" "$SHAPE" <<'EOF'
import sys
from minio3.model import build_tiny, save_checkpoint
out, shape = sys.argv[1], sys.argv[2]
kw = {}
if shape == "3b":   # Qwen2.5-VL-3B's text and vision shapes
    kw = dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                "mrope_section": [16, 24, 24]}),
              vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          fullatt_block_indexes=[7, 15, 23, 31]))
model, proc = build_tiny(**kw)
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
save_checkpoint(model, proc, f"{out}/model")
EOF
python sft.py --data "$OUT/cs.jsonl" --init "$OUT/model" --out "$OUT/sft" --steps 4 --batch 4 --lr 1e-5 \
    --precision bf16 --grad-checkpointing --save-every 4 --overwrite > "$OUT/sft.log" 2>&1
log "sft rc=$? $(tail -1 "$OUT/sft_log.jsonl" 2>/dev/null)"
python rl.py --model "$OUT/sft" --data "$OUT/probe/train.jsonl" --out "$OUT/rl" --steps 2 --questions 2 --group 4 \
    --max-turn-tokens 64 --lr 1e-6 --levels all --train-modules all --grad-checkpointing --overwrite > "$OUT/rl.log" 2>&1
log "rl rc=$? $(tail -1 "$OUT/rl_log.jsonl" 2>/dev/null)"
log "done"
