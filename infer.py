"""The engine: batched multi-turn generation with a KV cache kept across turns, and a CLI.

    python infer.py --model tiny-base --image IMG --question "What is ...?" [--max-turns 12] [--greedy]
                    [--json] [--save-inputs inputs.safetensors] [--draw search.png]
    python infer.py --bench

Every row of the batch is one conversation. Its tokens go into a preallocated KV cache once and
stay there: the prompt, each generated token, each observation turn with its crop. Nothing is
prefilled twice. The decoder forward is written out here over the transformers model's weights
(RMSNorm, grouped-query attention, SwiGLU, M-RoPE); the vision tower is the model's own.
Rows that finish leave the batch and waiting samples take their place.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import (IM_END, STOP_STRINGS, SYSTEM_PROMPT, Episode, encode_chunk, image_token_count, load,
                    prompt_text, rope_positions, tool_turn_text)

try:  # flash-attn is optional and used on CUDA only
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


@dataclass
class Sample:
    image: Image.Image | None           # None: a text-only conversation
    question: str
    system: str = SYSTEM_PROMPT
    forced: list[list[int]] | None = None   # scripted token ids per turn (tests, teacher forcing)
    context: tuple[str, list[Image.Image]] | None = None   # earlier turns (few-shot) and their images
    stop: tuple[str, ...] | None = None    # this row's stop strings (default: run()'s)


@dataclass
class Trajectory:
    token_ids: list[int]                 # the whole conversation, prompt included
    sampled_mask: list[bool]             # True where the model produced the token
    logprobs: list[float]                # log p of each sampled token at temperature 1 (0 elsewhere)
    turn_texts: list[str] = field(default_factory=list)
    crops: list[dict] = field(default_factory=list)
    shown: list[Image.Image] = field(default_factory=list)   # every image as the model saw it
    answer: str | None = None
    answered: bool = False
    exceeded_turns: bool = False         # called the tool on its last allowed turn (or out of images)
    over_length: bool = False            # ran out of context (max_total_tokens): masked like exceeded
    truncated: bool = False              # a turn ran out of its own token limit: ends unanswered, reward 0
    tool_errors: int = 0
    turns: int = 0

    @property
    def exceeded(self) -> bool:          # what over-turn masking masks
        return self.exceeded_turns or self.over_length

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "shown"}
        d["exceeded"] = self.exceeded
        return d


class _Row:
    """The state of one conversation in the batch: `ids` is the whole conversation so far, of
    which the first `length` tokens are in the cache; the rest (and `images`) wait to be fed."""

    def __init__(self, index: int, sample: Sample, budget):
        self.index, self.sample = index, sample
        self.episode = Episode(sample.image, budget)
        self.ids: list[int] = []
        self.sampled: list[bool] = []
        self.logprobs: list[float] = []
        self.images: list[Image.Image] = []    # images of the unfed tokens
        self.turn_ids: list[int] = []          # tokens of the assistant turn being generated
        self.tail = ""                         # the end of that turn's text (for stop strings)
        self.traj = Trajectory([], [], [])
        self.length = 0                        # tokens in the cache
        self.next_pos = 0                      # M-RoPE position of the next token to feed

    def add(self, ids: list[int], images: list[Image.Image] = ()):
        self.ids += ids
        self.sampled += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.images += list(images)


class Engine:
    def __init__(self, model, processor, max_batch: int = 16, max_len: int = 4096, device=None):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.lm = model.model.language_model
        cfg = model.config.text_config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.section = list(cfg.rope_parameters.get("mrope_section", [16, 24, 24]))
        self.inv_freq = self.lm.rotary_emb.inv_freq.float().to(self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.im_end = self.tok.convert_tokens_to_ids(IM_END)
        # tokens only the processor may write: a sampled <|image_pad|> would claim an image that
        # does not exist. Never chosen; log-probabilities stay those of the full distribution.
        vocab = self.tok.get_vocab()
        self.banned = torch.tensor([vocab[t] for t in BANNED_TOKENS if t in vocab], dtype=torch.long)
        self.use_flash = flash_attn_with_kvcache is not None and self.device.type == "cuda"
        # the cache: flash-attn wants [batch, length, kv_heads, head_dim]; SDPA reads
        # [batch, kv_heads, length, head_dim] without a copy, so each backend gets its own layout
        shape = ((max_batch, max_len, self.n_kv, self.head_dim) if self.use_flash else
                 (max_batch, self.n_kv, max_len, self.head_dim))
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lm.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lm.layers]
        self.fuse = self.device.type == "cpu"   # small CPU models: fewer, larger matrix products
        self.refresh()
        # the text of every token, to spot stop strings without decoding whole turns each step
        self.pieces = [self.tok.decode([i]) for i in range(len(self.tok))]
        self.prefill_tokens = 0   # statistics for the benchmark
        self.decode_tokens = 0

    def refresh(self):
        """Read the model's current weights (call after a training step; run() does it). On CPU
        the q/k/v and the gate/up projections are concatenated: one product instead of three/two."""
        self.w = []
        for layer in self.lm.layers:
            at, mlp = layer.self_attn, layer.mlp
            if self.fuse:   # the RMSNorm weights are folded in too: W diag(w)
                ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
                qkv = (torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]) * ln1,
                       torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]))
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * ln2
            else:
                qkv, gate_up = None, None
            self.w.append((qkv, gate_up))
        positions = torch.arange(self.max_len + 1, device=self.device)
        self.text_cos, self.text_sin = self._rope(positions[None, None].expand(3, 1, -1))   # [1, P, d]

    def _cache_rows(self, cache, slot, n, L, contiguous):
        """The first L cached positions of the given rows, as [n, kv_heads, L, head_dim]."""
        if self.use_flash:
            rows = cache[:n, :L] if contiguous else cache[slot, :L]
            return rows.transpose(1, 2)
        return cache[:n, :, :L] if contiguous else cache[slot, :, :L]

    # ------------------------------------------------------------------------------------------
    # The decoder, written out
    # ------------------------------------------------------------------------------------------
    def _rms(self, x, weight=None):
        """RMSNorm as Qwen2 computes it: in float32, then scaled by the weight in the model's dtype
        (weight None: it was folded into the next product)."""
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return x if weight is None else x * weight

    def _rope(self, pos):
        """cos, sin [n, T, head_dim] from M-RoPE positions [3, n, T]: the rotary frequencies are
        split in sections that take the temporal, height and width position in turn."""
        freqs = pos[..., None].float() * self.inv_freq                  # [3, n, T, D/2]
        parts = freqs.split(self.section, dim=-1)
        freqs = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _attend(self, q, K, V, mask):
        """Attention of q [n, heads, T, d] over K, V [n, kv_heads, L, d] where mask [n, 1, T, L].
        A decode step (T = 1) is written as two products over the grouped heads, which on CPU is
        faster than the fused kernel; longer chunks use scaled_dot_product_attention."""
        n, H, T, d = q.shape
        if T > 1:
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
        g = H // self.n_kv
        scores = torch.matmul(q.view(n, self.n_kv, g, d), K.transpose(-1, -2)) * d ** -0.5   # [n, kv, g, L]
        scores = scores.masked_fill(~mask.view(n, 1, 1, -1), float("-inf"))
        return torch.matmul(scores.softmax(-1), V).view(n, H, 1, d)

    @staticmethod
    def _rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    @torch.no_grad()
    def forward(self, slots: list[int], chunks: list[list[int]], images: list[list[Image.Image]],
                starts: list[int], positions: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Append one chunk to each listed cache row and return the logits after each chunk's last
        token ([n, vocab]) and the M-RoPE position that follows each chunk.
        `starts` are the rows' cache lengths, `positions` their next M-RoPE positions."""
        n, T = len(slots), max(len(c) for c in chunks)
        dev = self.device
        flat = [im for ims in images for im in ims]
        if T == 1 and not flat:   # a decode step: one text token a row, positions just advance
            ids = torch.tensor(chunks)
            pos = torch.tensor(positions)[None, :, None].expand(3, n, 1)
            nexts = [p + 1 for p in positions]
        else:
            ids = torch.full((n, T), self.tok.pad_token_id, dtype=torch.long)
            pos = torch.zeros(3, n, T, dtype=torch.long)
            if flat:
                pixel_values, grids = self.processor.pixels(flat)
                grid_list = [tuple(g) for g in grids.tolist()]
            nexts, g = [], 0
            for r, chunk in enumerate(chunks):
                ids[r, :len(chunk)] = torch.tensor(chunk)
                p, nxt = rope_positions(chunk, grid_list[g:g + len(images[r])] if images[r] else [],
                                        positions[r], self.processor.image_token_id, self.processor.merge)
                g += len(images[r])
                pos[:, r, :len(chunk)] = p
                nexts.append(nxt)
        ids, pos = ids.to(dev), pos.to(dev)
        x = self.lm.embed_tokens(ids)
        if flat:
            feats = self.model.model.visual(pixel_values.to(dev, self.dtype), grid_thw=grids.to(dev)).pooler_output
            mask = ids == self.processor.image_token_id
            x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        if T == 1 and not flat:   # text positions: a table lookup
            cos, sin = self.text_cos[0, pos[0, :, 0]][:, None], self.text_sin[0, pos[0, :, 0]][:, None]
        else:
            cos, sin = self._rope(pos)
        cos, sin = cos[:, None], sin[:, None]                              # [n, 1, T, D]
        lens = torch.tensor([len(c) for c in chunks], device=dev)
        start = torch.tensor(starts, device=dev)
        slot = torch.tensor(slots, device=dev)
        write = (start[:, None] + torch.arange(T, device=dev)).clamp(max=self.max_len - 1)   # [n, T]
        L = int((start + lens).max())
        # query i of row r sees keys 0 .. start_r + i (its own chunk causally, never padding)
        limit = start[:, None] + torch.minimum(torch.arange(T, device=dev)[None], lens[:, None] - 1)
        attn_mask = (torch.arange(L, device=dev)[None, None] <= limit[..., None])[:, None]   # [n,1,T,L]
        contiguous = slots == list(range(n))
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, layer in enumerate(self.lm.layers):
            at, mlp = layer.self_attn, layer.mlp
            (qkv, gate_up) = self.w[i]
            h = self._rms(x, None if qkv is not None else layer.input_layernorm.weight)
            if qkv is not None:
                q, k, v = F.linear(h, *qkv).split([nq, nk, nk], dim=-1)
            else:
                q, k, v = at.q_proj(h), at.k_proj(h), at.v_proj(h)
            # rotate q and k together (M-RoPE), as [n, heads, T, head_dim]
            qk = self._rotate(torch.cat([q, k], -1).view(n, T, -1, self.head_dim).transpose(1, 2), cos, sin)
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:].transpose(1, 2)      # k: [n, T, kv, d]
            v = v.view(n, T, self.n_kv, self.head_dim)
            if self.use_flash and int(start.max()) + T <= self.max_len:
                o = flash_attn_with_kvcache(q.transpose(1, 2), self.k[i], self.v[i], k=k, v=v,
                                            cache_seqlens=start.int(), cache_batch_idx=slot.int(), causal=True)
            else:
                if self.use_flash:
                    self.k[i][slot[:, None], write], self.v[i][slot[:, None], write] = k, v
                else:
                    self.k[i][slot[:, None], :, write], self.v[i][slot[:, None], :, write] = k, v
                K = self._cache_rows(self.k[i], slot, n, L, contiguous)
                V = self._cache_rows(self.v[i], slot, n, L, contiguous)
                o = self._attend(q, K, V, attn_mask).transpose(1, 2)
            x = x + at.o_proj(o.reshape(n, T, -1))
            h = self._rms(x, None if gate_up is not None else layer.post_attention_layernorm.weight)
            if gate_up is not None:
                gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(F.silu(gate) * up)
        last = x[torch.arange(n, device=dev), lens - 1]
        logits = self.model.lm_head(self._rms(last, self.lm.norm.weight))
        return logits.float(), nexts

    # ------------------------------------------------------------------------------------------
    # Episodes
    # ------------------------------------------------------------------------------------------
    def run(self, samples: list[Sample], max_turns: int = 6, greedy: bool = False, temperature: float = 1.0,
            top_p: float = 1.0, seed: int = 0, max_turn_tokens: int = 256, max_total_tokens: int | None = None,
            max_images: int = 32, stop: tuple[str, ...] = STOP_STRINGS, progress: bool = True,
            on_text=None, eos: bool = True) -> list[Trajectory]:
        """Play every sample's episode to its end; results come back in the samples' order.
        `on_text(sample_index, text)` is called with each piece of the conversation as it grows."""
        max_total = min(max_total_tokens or self.max_len, self.max_len)
        self.refresh()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        waiting = list(range(len(samples)))[::-1]
        rows: list[_Row] = []            # rows[i] lives in cache slot i
        results: list[Trajectory | None] = [None] * len(samples)
        bar = tqdm(total=len(samples), desc="rollout", disable=not progress, dynamic_ncols=True, leave=False)

        def new_row() -> _Row:
            i = waiting.pop()
            r = _Row(i, samples[i], self.processor.budget)
            ctx_text, ctx_images = r.sample.context or ("", [])
            text = prompt_text(r.sample.question, r.sample.system, ctx_text, image=r.sample.image is not None)
            images = [self.processor.budget.resize(im) for im in ctx_images] + r.episode.shown[:1]
            r.add(encode_chunk(self.tok, text, [image_token_count(im) for im in images]), images)
            if on_text:
                on_text(i, text)
            return r

        def finish(slot: int):
            r = rows[slot]
            t = r.traj
            t.token_ids, t.sampled_mask, t.logprobs = r.ids, r.sampled, r.logprobs
            t.crops, t.shown, t.tool_errors = r.episode.crops, r.episode.shown, r.episode.errors
            results[r.index] = t
            bar.update(1)
            if waiting:              # a waiting sample takes the slot
                rows[slot] = new_row()
                return
            last = rows.pop()        # else the last row moves here: active rows stay contiguous
            if slot < len(rows):
                for cache in self.k + self.v:
                    if self.use_flash:
                        cache[slot, :last.length] = cache[len(rows), :last.length]
                    else:
                        cache[slot, :, :last.length] = cache[len(rows), :, :last.length]
                rows[slot] = last

        while waiting and len(rows) < self.max_batch:
            rows.append(new_row())
        while rows:
            # 1. feed what each row has not fed yet: a new chunk (prompt, observation turn) goes
            #    through a prefill of those rows; a single sampled token through one decode step
            logits = {}
            for i, r in enumerate(rows):
                if len(r.ids) > max_total:
                    r.traj.over_length = True
            pre = [i for i, r in enumerate(rows) if len(r.ids) - r.length > 1 and not r.traj.over_length]
            dec = [i for i, r in enumerate(rows) if len(r.ids) - r.length == 1 and not r.traj.over_length]
            if pre:
                out, nexts = self.forward(pre, [rows[i].ids[rows[i].length:] for i in pre],
                                          [rows[i].images for i in pre], [rows[i].length for i in pre],
                                          [rows[i].next_pos for i in pre])
                for j, i in enumerate(pre):
                    r = rows[i]
                    self.prefill_tokens += len(r.ids) - r.length
                    r.length, r.next_pos, r.images = len(r.ids), nexts[j], []
                    logits[i] = out[j]
            if dec:
                # every active row goes through the step, so the cache is used in place; a row that
                # is not decoding writes one dummy entry past its length, overwritten later
                out, _ = self.forward(list(range(len(rows))), [r.ids[-1:] for r in rows], [[] for _ in rows],
                                      [r.length for r in rows], [r.next_pos for r in rows])
                for i in dec:
                    rows[i].length += 1
                    rows[i].next_pos += 1
                    logits[i] = out[i]
                self.decode_tokens += len(dec)
            # 2. choose each row's next token; end turns and episodes
            done = [i for i, r in enumerate(rows) if r.traj.over_length]
            order = sorted(logits)
            if order:
                stacked = torch.stack([logits[i] for i in order])
                logp = F.log_softmax(stacked, -1)
                allowed = stacked.index_fill(1, self.banned.to(stacked.device), float("-inf"))
                chosen = allowed.argmax(-1) if greedy else _sample(allowed, temperature, top_p, gen)
                for j, i in enumerate(order):   # scripted turns (tests, benchmarks) override the choice
                    r = rows[i]
                    forced = r.sample.forced[r.traj.turns] if r.sample.forced and r.traj.turns < len(r.sample.forced) else None
                    if forced is not None and len(r.turn_ids) < len(forced):
                        chosen[j] = forced[len(r.turn_ids)]
                chosen_lp = logp.gather(1, chosen[:, None].to(logp.device))[:, 0].tolist()
                chosen = chosen.tolist()
            for j, i in enumerate(order):
                r = rows[i]
                turn = r.traj.turns
                token = chosen[j]
                r.ids.append(token)
                r.sampled.append(True)
                r.logprobs.append(chosen_lp[j])
                r.turn_ids.append(token)
                r.tail = (r.tail + self.pieces[token])[-64:]
                closed = eos and token == self.im_end
                stopped = closed or any(s in r.tail for s in (r.sample.stop if r.sample.stop is not None else stop))
                if not stopped:
                    if len(r.turn_ids) >= max_turn_tokens or len(r.ids) >= max_total:
                        text = self.tok.decode(r.turn_ids)
                        if len(r.ids) >= max_total:
                            r.traj.over_length = True     # out of context: over-turn masking masks it
                        else:
                            r.traj.truncated = True       # a rambling turn: no action, no answer
                        r.traj.turns += 1
                        r.traj.turn_texts.append(text)
                        if on_text:
                            on_text(r.index, text)
                        done.append(i)
                    continue
                text = self.tok.decode(r.turn_ids)
                r.traj.turns += 1
                r.traj.turn_texts.append(text)
                r.turn_ids, r.tail = [], ""
                if on_text:
                    on_text(r.index, text)
                action = r.episode.parse(text.replace(IM_END, ""))
                if action.kind in ("answer", "none"):
                    r.traj.answer, r.traj.answered = action.answer, action.kind == "answer"
                    done.append(i)
                elif turn + 1 >= max_turns or len(r.episode.images) >= max_images:
                    r.traj.exceeded_turns = True      # a tool call on the last allowed turn
                    done.append(i)
                else:
                    user, new = r.episode.apply(action)
                    chunk = tool_turn_text(user)
                    r.add(encode_chunk(self.tok, chunk, [image_token_count(new)] if new else []), [new] if new else [])
                    if on_text:
                        on_text(r.index, chunk)
            for i in sorted(set(done), reverse=True):
                finish(i)
        bar.close()
        return results


JUDGE_PROMPT = ("You grade answers to questions about images.\nQuestion: {question}\nReference answer: {reference}\n"
                "Candidate answer: {answer}\nDoes the candidate answer mean the same as the reference answer? "
                "Reply with exactly \"Score: 1\" if it does and \"Score: 0\" if it does not.")


def judge(engine: "Engine", rows: list[dict], answers: list[str | None]) -> list[float]:
    """Mini-o3's LLM-judge reward: exact/normalised match first; otherwise the judge model (run
    through the same engine, text only, greedy) decides with "Score: 0" or "Score: 1"."""
    import re
    from common import PLAIN_SYSTEM_PROMPT, grade
    scores = [grade(a, r) for a, r in zip(answers, rows)]
    ask = [i for i, (a, s) in enumerate(zip(answers, scores)) if a is not None and s == 0 and not rows[i].get("options")]
    samples = [Sample(None, JUDGE_PROMPT.format(question=rows[i]["problem"].replace("<image>", "").strip(),
                                                reference=rows[i]["solution"], answer=answers[i]),
                      system=PLAIN_SYSTEM_PROMPT) for i in ask]
    for i, t in zip(ask, engine.run(samples, max_turns=1, greedy=True, max_turn_tokens=32, progress=False)):
        scores[i] = 1.0 if re.search(r"Score:\s*1", t.turn_texts[-1] if t.turn_texts else "") else 0.0
    return scores


BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of [rows, vocab] logits: temperature, then top-p (nucleus) filtering."""
    probs = F.softmax(logits.float() / max(temperature, 1e-6), -1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p      # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]



# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def draw_search(image: Image.Image, crops: list[dict], path: str):
    """The image with every zoom box drawn and numbered in order."""
    from PIL import ImageDraw
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    w = max(2, im.width // 300)
    for i, c in enumerate(crops, 1):
        x0, y0, x1, y1 = c["pixel_box"]
        d.rectangle([x0, y0, x1, y1], outline=(255, 0, 160), width=w)
        d.text((x0 + w + 2, y0 + w + 2), str(i), fill=(255, 0, 160))
    im.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-base", help="tiny | tiny-base | a checkpoint folder | a hub name")
    ap.add_argument("--image")
    ap.add_argument("--question")
    ap.add_argument("--max-turns", type=int, default=12)
    ap.add_argument("--max-turn-tokens", type=int, default=512)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, help="override the checkpoint's pixel budget")
    ap.add_argument("--json", action="store_true", help="print the trajectory as JSON on the last line")
    ap.add_argument("--save-inputs", help="write input_ids, pixel_values, image_grid_thw (safetensors)")
    ap.add_argument("--draw", help="save the image with the zoom boxes numbered")
    ap.add_argument("--bench", action="store_true", help="run the engine benchmark")
    args = ap.parse_args()
    if args.bench:
        from bench import bench
        bench()
        return
    if not args.image or not args.question:
        ap.error("--image and --question are required (or --bench)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load(args.model, device=device)
    if args.max_pixels:
        processor.budget.max_pixels = args.max_pixels
    engine = Engine(model, processor, max_batch=1)
    image = Image.open(args.image).convert("RGB")
    out = sys.stderr if args.json else sys.stdout
    traj = engine.run([Sample(image, args.question)], max_turns=args.max_turns, greedy=args.greedy,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      max_turn_tokens=args.max_turn_tokens, progress=False,
                      on_text=lambda i, text: print(text.replace("<|image_pad|>", ""), end="", file=out, flush=True))[0]
    print(f"\n\nanswer: {traj.answer!r}  turns: {traj.turns}  zooms: {len(traj.crops)}  tool errors: "
          f"{traj.tool_errors}  exceeded: {traj.exceeded}", file=out)
    if args.save_inputs:
        from safetensors.torch import save_file
        pixel_values, grids = processor.pixels(traj.shown)
        save_file({"input_ids": torch.tensor([traj.token_ids]), "pixel_values": pixel_values.contiguous(),
                   "image_grid_thw": grids.contiguous()}, args.save_inputs)
    if args.draw:
        draw_search(image, traj.crops, args.draw)
    if args.json:
        print(json.dumps(traj.to_json()))


if __name__ == "__main__":
    main()
