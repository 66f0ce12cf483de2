"""The rollout engine, one file per role:

  engine.py    `Engine.run`: the loop that plays many conversations at once, turn after turn
  sequence.py  `Sample` in, `Trajectory` out, and `Slot`, one conversation in a row of the batch
  sampler.py   `Settings` (how to generate) and `TokenChooser` (the next token from the logits)
  decoder.py   the model's forward over a KV cache that keeps every conversation's tokens
  runner.py    several decode steps on the device between reads of the host (CUDA graphs)
"""
from minio3.engine.engine import Engine
from minio3.engine.sampler import Settings
from minio3.engine.sequence import Sample, Trajectory

__all__ = ["Engine", "Sample", "Settings", "Trajectory"]
