"""Decode windows: k decode steps run on the device, then one read back to the host.

In the engine's eager loop the host reads every step's tokens to check stop strings and tool calls.
A window instead keeps every row's state in fixed device buffers (the token to feed, its text
position, the cache length, the length of the current turn, whether the row still runs), and
each step does, on the device only: the decoder's static step (`Decoder.decode_static`), the
choice of the next tokens (`TokenChooser.choose`: bias, temperature, top-p, log-probs), and stop
detection: a row stops at the end-of-turn token, at a token that can complete a stop string (a
precomputed vocabulary mask), when its turn or the context is about to reach its limit. A stopped
row stays frozen (its cache length does not advance; the step still computes it, shapes stay
static) until the host has looked at it. After k steps the host reads the tokens, log-probs and
which rows were running at each step, in one copy, and hands them to the engine's usual
per-token bookkeeping, which finds the exact stop strings and carries out tool calls.

On CUDA with flash-attn (whose kernel takes the cache lengths as a tensor, so no shape depends on
them) the decoder's step is captured once per batch-size bucket as a CUDA graph and replayed;
sampling runs after it, outside the graph. Elsewhere the same step runs eagerly; that is what the
tests check, against the eager engine, token for token.
"""
from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def stop_mask(pieces: list[str], stops: tuple[str, ...]) -> torch.Tensor:
    """[vocab] True for every token whose text could end a stop string: the string is inside the
    token, or the token begins with the string's last part (the first part written before it)."""
    def ends_one(p: str) -> bool:
        return any(s in p or any(p.startswith(s[j:]) for j in range(1, len(s))) for s in stops if s)
    return torch.tensor([ends_one(p) for p in pieces], dtype=torch.bool)


class DecodeWindow:
    """Fixed buffers for up to `rows` conversations and the step over them (see the module)."""

    def __init__(self, decoder, rows: int):
        dev = decoder.device
        self.decoder, self.rows = decoder, rows
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)     # the token to feed next
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)     # its text position
        self.lens = torch.zeros(rows, dtype=torch.long, device=dev)    # tokens in the cache
        self.turn = torch.zeros(rows, dtype=torch.long, device=dev)    # tokens of the current turn
        self.live = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.graphs: dict[int, tuple] = {}       # batch bucket -> (graph, its logits buffer)
        self.use_graphs = dev.type == "cuda" and decoder.use_flash

    def load(self, ids: list[int], pos: list[int], lens: list[int], turn: list[int]):
        """The rows' state at the start of a window (one host-to-device copy per buffer)."""
        n = len(ids)
        for buf, values in ((self.ids, ids), (self.pos, pos), (self.lens, lens), (self.turn, turn)):
            buf[:n].copy_(torch.tensor(values), non_blocking=True)
        self.live[:n] = True
        self.live[n:] = False

    def _logits(self, n: int, L: int) -> torch.Tensor:
        if not self.use_graphs:
            return self.decoder.decode_static(self.ids[:n], self.pos[:n], self.lens[:n], L)
        b = next(x for x in BUCKETS if x >= n)
        if b not in self.graphs:                  # capture once per bucket (after a warm-up run)
            args = (self.ids[:b], self.pos[:b], self.lens[:b], self.decoder.max_len)
            self.decoder.decode_static(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.decoder.decode_static(*args)
            self.graphs[b] = (graph, out)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def run(self, n: int, k: int, L: int, choose, stops: torch.Tensor, eos: int | None, max_turn_tokens: int,
            max_total: int):
        """k steps of rows 0..n-1 whose caches hold fewer than L - k tokens (L: the cache span read,
        known to the host). Returns host lists: tokens [k][n], log-probs [k][n], and ran [k][n]
        (whether the row was running at that step, i.e. whether its token counts)."""
        toks, lps, ran = [], [], []
        stops = stops.to(self.ids.device)
        for _ in range(k):
            logits = self._logits(n, L)
            token, lp = choose(logits)
            live = self.live[:n].clone()
            toks.append(token)
            lps.append(lp)
            ran.append(live)
            ended = stops[token] | (self.turn[:n] + 1 >= max_turn_tokens) | (self.lens[:n] + 2 >= max_total)
            if eos is not None:
                ended |= token == eos
            step = live.long()
            self.lens[:n] += step                 # the fed token is in the cache now
            self.pos[:n] += step
            self.turn[:n] += step
            self.ids[:n] = torch.where(live, token, self.ids[:n])
            self.live[:n] = live & ~ended
        out = torch.stack([torch.stack(toks).double(), torch.stack(lps).double(), torch.stack(ran).double()])
        t, lp, r = out.cpu().tolist()              # the window's one read back
        return [[int(x) for x in row] for row in t], lp, [[bool(x) for x in row] for row in r]
