import sys, time, torch
sys.argv = ["sft.py"]
import sft, parallel
from pathlib import Path
from model import load, collate
from protocol import DEFAULT
from torch.profiler import profile, ProfilerActivity
rows = sft.read_trajectories(["runs/tiny/coldstart.jsonl"])
model, processor = load("tiny-base")
for p in model.model.visual.parameters(): p.requires_grad_(False)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def make(k):
    b = collate(sft.file_batch(rows, k, 8, 0, processor, 4096, DEFAULT), processor, "cpu")
    d = sft.drill_batch(k, 8, 0, processor, 0, sft.DRILL_SEARCH_SHARE, "compare", "verdict")
    return [b, {**collate(d, processor, "cpu"), "drill": torch.tensor(0.5)}]
T = {"make": 0, "fwd": 0, "bwd": 0, "opt": 0}
def step(k):
    t = time.time(); micro = make(k); T["make"] += time.time() - t
    n_tok = int(micro[0]["loss_mask"][:, 1:].sum())
    for b in micro:
        t = time.time()
        with parallel.autocast(model, "fp32"):
            loss = sft.sft_loss(model, b, n_tok, 2)
        T["fwd"] += time.time() - t; t = time.time()
        loss.backward(); T["bwd"] += time.time() - t
    t = time.time(); opt.step(); opt.zero_grad(); T["opt"] += time.time() - t
    return micro
for k in range(3):
    t0 = time.time(); m = step(k); print(k, [tuple(b["input_ids"].shape) for b in m], round(time.time() - t0, 2), flush=True)
print("shapes", [tuple(b["input_ids"].shape) for b in m], "pix", m[0]["pixel_values"].shape)
T = dict.fromkeys(T, 0)
for k in range(3, 6): step(k)
print({k: round(v / 3, 3) for k, v in T.items()})
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for k in range(6, 8): step(k)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
