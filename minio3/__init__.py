"""mini-o3's library: what the six stage scripts (make_probe, collect, sft, rl, infer, eval) share.

  world.py         the tiny world: synthetic Visual-Probe pictures, and the pixel rules that read them
  conversation.py  the protocol every stage agrees on: prompts, the tool-call parser, the crop tool
                   (`Episode`), tokens and M-RoPE positions, `render`, `grade`
  protocol.py      the protocol's texts and budgets, swappable for the official ones (--preset mini-o3)
  model.py         loading checkpoints, the tiny Qwen2.5-VL, batches and log-probabilities
  engine/          batched multi-turn rollouts over a KV cache (`Engine.run`)
  explorer.py      the scripted teacher of the cold start, and the hasty teacher's guess
  drills.py        short synthetic exercises of one skill, trained beside the trajectories
  trainer.py       the training loop (AdamW, schedule, checkpoints, resume)
  parallel.py      one process or torchrun with FSDP2; bf16 where it pays
  judge.py         the LLM-judge reward for open answers
  failures.py      why a search failed, from positions and boxes
  plots.py, report.py   PNG plots and the HTML report page
  data.py          reading and checking every input file; atomic writes
  sharegpt.py      LLaMA-Factory's ShareGPT format, in and out
"""
