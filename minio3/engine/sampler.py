"""How to generate (`Settings`: decoding, limits, stop strings, the protocol) and how the next token
is chosen from the logits (`TokenChooser`: greedy or temperature/top-p sampling, scripted tokens,
processor-only tokens banned)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minio3.conversation import STOP_STRINGS
from minio3.model import nucleus
from minio3.protocol import DEFAULT, Protocol

# tokens only the processor may write: a sampled <|image_pad|> would claim an image that does not exist
BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@dataclass
class Settings:
    """How to generate: decoding, limits, stop strings."""
    max_turns: int = 6                   # assistant turns; a tool call on the last one is "exceeded"
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_turn_tokens: int = 256           # one turn longer than this is cut: the episode ends, unanswered
    max_total_tokens: int | None = None  # the whole conversation (default: the cache length)
    max_images: int = 32
    stop: tuple[str, ...] = STOP_STRINGS
    eos: bool = True                     # <|im_end|> ends a turn (off: the benchmark's fixed-length turns)
    protocol: Protocol = DEFAULT         # texts, observation numbering, parser, answer rule
    window: int | None = None            # decode steps between host reads (runner.py); None: 8 on CUDA, 1 else



class TokenChooser:
    """Each row's next token from its logits, on the logits' device: processor-only ids get a -inf
    bias (never chosen), then greedy or temperature/top-p sampling from one seeded generator; a
    scripted (forced) token overrides the choice. The log-probability returned is that of the
    distribution sampled from (`model.nucleus` at the temperature: rl.py trains on the same), at
    temperature 1 when greedy; the banned ids' mass, nearly none, is not taken out of it.
    `choose` reads nothing back to the host; `__call__` is the one read per step the engine makes."""

    def __init__(self, banned: torch.Tensor, settings: Settings):
        self.banned, self.s = banned, settings
        self.bias, self.gen = None, None

    def choose(self, logits: torch.Tensor, forced: list[int | None] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [rows], their log-probs [rows]) as tensors on the logits' device."""
        if self.bias is None or self.bias.device != logits.device or self.bias.numel() != logits.shape[-1]:
            self.bias = torch.zeros(logits.shape[-1], device=logits.device)
            self.bias[self.banned.to(logits.device)] = float("-inf")
            self.gen = torch.Generator(device=logits.device).manual_seed(self.s.seed)
        if self.s.greedy:
            logp = F.log_softmax(logits.float(), -1)
            chosen = (logits + self.bias).argmax(-1)
        else:   # the nucleus (all of it at top_p 1) of the distribution at the temperature
            logp, drop = nucleus(F.log_softmax(logits.float() / max(self.s.temperature, 1e-6), -1), self.s.top_p)
            keep = ~drop & (self.bias == 0)
            keep |= ~keep.any(-1, keepdim=True) & (self.bias == 0)   # a nucleus of banned ids only: any allowed one
            probs = logp.exp() * keep
            chosen = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
        if any(t is not None for t in forced):
            scripted = torch.tensor([-1 if t is None else t for t in forced]).to(chosen.device, non_blocking=True)
            chosen = torch.where(scripted >= 0, scripted, chosen)
        return chosen, logp.gather(1, chosen[:, None])[:, 0]

    def __call__(self, logits: torch.Tensor, forced: list[int | None]) -> tuple[list[int], list[float]]:
        chosen, lp = self.choose(logits, forced)
        both = torch.stack([chosen.double(), lp.double()]).cpu().tolist()   # one read back
        return [int(t) for t in both[0]], both[1]
