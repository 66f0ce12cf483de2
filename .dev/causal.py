import sys, time, torch
import sft
from model import load, collate, token_logprobs
from protocol import DEFAULT
rows = sft.read_trajectories(["runs/tiny/coldstart.jsonl"])
model, processor = load("tiny-base")
for p in model.model.visual.parameters(): p.requires_grad_(False)
model.train()
for k in (0, 2):
    b = collate(sft.file_batch(rows, k, 8, 0, processor, 4096, DEFAULT), processor, "cpu")
    nb = {**b, "attention_mask": None}
    a = token_logprobs(model, b); c = token_logprobs(model, nb)
    m = b["attention_mask"].bool()
    print(tuple(b["input_ids"].shape), "max diff valid", (a - c)[m].abs().max().item(), flush=True)
    for name, bb in (("mask", b), ("none", nb)) * 2:
        t = time.time(); lp = token_logprobs(model, bb); t1 = time.time(); (lp * bb["loss_mask"]).sum().backward(); t2 = time.time()
        print(name, "fwd %.2f bwd %.2f" % (t1 - t, t2 - t1), flush=True)
