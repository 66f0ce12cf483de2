"""The decoder written out over a Qwen2.5-VL model's weights, with its KV cache (the engine's kernels).

`Decoder.forward` appends one chunk of tokens (a prompt, an observation turn with its image, or a
single sampled token) to each of several cache rows and returns the logits after each chunk:
RMSNorm, grouped-query attention over the cached keys and values, SwiGLU, and M-RoPE positions
that continue where each row stopped. The vision tower is the model's own. A test checks the
logits against the transformers forward without a cache. infer.py's `Engine` schedules the rows;
this file only computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from minio3.conversation import rope_positions

try:  # flash-attn is optional and used on CUDA only
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


# ----------------------------------------------------------------------------------------------
# The KV cache: one preallocated tensor per layer for K and for V, a row per conversation
# ----------------------------------------------------------------------------------------------
class KVCache:
    """K and V of `rows` conversations of up to `length` tokens, for every layer.

    The layout is chosen once: "flash" is [rows, length, kv_heads, dim] (what
    flash_attn_with_kvcache reads and writes itself); "sdpa" is [rows, kv_heads, length, dim], which
    scaled_dot_product_attention reads without a copy. `read` always returns [n, kv_heads, L, dim]."""

    def __init__(self, layers: int, rows: int, length: int, kv_heads: int, head_dim: int, dtype, device,
                 layout: str = "sdpa"):
        if layout == "flash":
            shape = (rows, length, kv_heads, head_dim)
        else:
            shape = (rows, kv_heads, length, head_dim)
        self.layout, self.length = layout, length
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def write(self, layer: int, slots: torch.Tensor, where: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [n, T, kv_heads, dim] of rows `slots` [n] at positions `where` [n, T]."""
        if self.layout == "flash":
            self.k[layer][slots[:, None], where], self.v[layer][slots[:, None], where] = k, v
        else:
            self.k[layer][slots[:, None], :, where], self.v[layer][slots[:, None], :, where] = k, v

    def read(self, layer: int, slots: torch.Tensor, L: int, contiguous: bool = False):
        """K, V [n, kv_heads, L, dim]: the first L positions of rows `slots`. `contiguous` says the
        slots are 0..n-1, which lets the sdpa layout hand out a view instead of a gathered copy."""
        out = []
        for cache in (self.k[layer], self.v[layer]):
            n = len(slots)
            if self.layout == "flash":
                out.append((cache[:n, :L] if contiguous else cache[slots, :L]).transpose(1, 2))
            else:
                out.append(cache[:n, :, :L] if contiguous else cache[slots, :, :L])
        return out

    def move(self, src: int, dst: int, n: int):
        """Copy the first n positions of row src into row dst (every layer)."""
        for cache in self.k + self.v:
            if self.layout == "flash":
                cache[dst, :n] = cache[src, :n]
            else:
                cache[dst, :, :n] = cache[src, :, :n]


@dataclass
class _Step:
    """Where one forward pass reads and writes: rows, cache lengths, and the attention mask."""
    slot: torch.Tensor         # [n] cache rows
    start: torch.Tensor        # [n] tokens already cached in each row
    lens: torch.Tensor         # [n] tokens fed in this pass
    write: torch.Tensor        # [n, T] cache positions of the new tokens
    mask: torch.Tensor | None  # [n, 1, T, L] which cached keys each new query sees (None: flash)
    L: int                     # cached length to read after writing
    contiguous: bool           # slots are 0..n-1
    fits: bool                 # every row's chunk fits in the cache (flash writes it whole)


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------
class Decoder:
    def __init__(self, model, processor, max_batch: int, max_len: int, device=None, attention: str = "auto"):
        """attention: "auto" (flash_attn_with_kvcache on CUDA in fp16/bf16 when it is installed, else
        scaled_dot_product_attention), "flash" or "sdpa" to force one (tests run the flash branch on
        the CPU through a reference implementation)."""
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
        self.max_len = max_len
        self.use_flash = attention == "flash" or (attention == "auto" and flash_attn_with_kvcache is not None
                                                  and self.device.type == "cuda"
                                                  and self.dtype in (torch.float16, torch.bfloat16))
        self.cache = KVCache(len(self.lm.layers), max_batch, max_len, self.n_kv, self.head_dim, self.dtype,
                             self.device, "flash" if self.use_flash else "sdpa")
        self.fuse = self.device.type == "cpu"   # small CPU models: fewer, larger matrix products
        self.refresh()

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
        if not hasattr(self, "text_cos"):   # made once: a captured CUDA graph keeps reading these tensors
            positions = torch.arange(self.max_len + 1, device=self.device)
            self.text_cos, self.text_sin = self._rope(positions[None, None].expand(3, 1, -1))   # [1, P, d]

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

    @staticmethod
    def _rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

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

    def _inputs(self, chunks, images, positions):
        """Token ids [n, T], M-RoPE positions [3, n, T], the position after each chunk, and the
        pixels of the chunks' images (None when there are none)."""
        n, T = len(chunks), max(len(c) for c in chunks)
        flat = [im for ims in images for im in ims]
        if T == 1 and not flat:   # a decode step: one text token a row, positions just advance
            pos = torch.tensor(positions)[None, :, None].expand(3, n, 1)
            return torch.tensor(chunks), pos, [p + 1 for p in positions], None
        ids = torch.full((n, T), self.tok.pad_token_id, dtype=torch.long)
        pos = torch.zeros(3, n, T, dtype=torch.long)
        pixels = self.processor.pixels(flat) if flat else None
        grid_list = [tuple(g) for g in pixels[1].tolist()] if flat else []
        nexts, g = [], 0
        for r, chunk in enumerate(chunks):
            ids[r, :len(chunk)] = torch.tensor(chunk)
            p, nxt = rope_positions(chunk, grid_list[g:g + len(images[r])], positions[r],
                                    self.processor.image_token_id, self.processor.merge)
            g += len(images[r])
            pos[:, r, :len(chunk)] = p
            nexts.append(nxt)
        return ids, pos, nexts, pixels

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Host numbers onto the device without waiting (pinned memory, non-blocking copy on CUDA)."""
        t = torch.tensor(values)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _step(self, slots, chunks, starts) -> _Step:
        """Everything a pass needs to know about where it writes and reads, computed from the host's
        own lists (never read back from the device: no synchronisation)."""
        dev, T = self.device, max(len(c) for c in chunks)
        lens, start = self._to_device([len(c) for c in chunks]), self._to_device(starts)
        write = (start[:, None] + torch.arange(T, device=dev)).clamp(max=self.max_len - 1)   # [n, T]
        L = max(s + len(c) for s, c in zip(starts, chunks))
        fits, mask = max(starts) + T <= self.max_len, None
        if not (self.use_flash and fits):   # query i of row r sees keys 0 .. start_r + i (causal, no padding)
            limit = start[:, None] + torch.minimum(torch.arange(T, device=dev)[None], lens[:, None] - 1)
            mask = (torch.arange(L, device=dev)[None, None] <= limit[..., None])[:, None]   # [n, 1, T, L]
        contiguous = slots == list(range(len(slots)))
        return _Step(self._to_device(slots), start, lens, write, mask, L, contiguous, fits)

    def _layer(self, i: int, x, cos, sin, st: _Step):
        """One decoder layer over x [n, T, hidden]; the new keys and values go into the cache."""
        layer = self.lm.layers[i]
        at, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = self.w[i]
        n, T = x.shape[:2]
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        h = self._rms(x, None if qkv is not None else layer.input_layernorm.weight)
        q, k, v = F.linear(h, *qkv).split([nq, nk, nk], dim=-1) if qkv is not None else (
            at.q_proj(h), at.k_proj(h), at.v_proj(h))
        # rotate q and k together (M-RoPE), as [n, heads, T, head_dim]
        qk = self._rotate(torch.cat([q, k], -1).view(n, T, -1, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:].transpose(1, 2)      # k: [n, T, kv, d]
        v = v.view(n, T, self.n_kv, self.head_dim)
        if self.use_flash and st.fits:   # flash writes the cache itself
            o = flash_attn_with_kvcache(q.transpose(1, 2), self.cache.k[i], self.cache.v[i], k=k, v=v,
                                        cache_seqlens=st.start.int(), cache_batch_idx=st.slot.int(),
                                        causal=True)
        else:
            self.cache.write(i, st.slot, st.write, k, v)
            K, V = self.cache.read(i, st.slot, st.L, st.contiguous)
            o = self._attend(q, K, V, st.mask).transpose(1, 2)
        x = x + at.o_proj(o.reshape(n, T, -1))
        h = self._rms(x, None if gate_up is not None else layer.post_attention_layernorm.weight)
        if gate_up is not None:
            gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        return x + mlp.down_proj(F.silu(gate) * up)

    @torch.no_grad()
    def decode_static(self, ids: torch.Tensor, pos: torch.Tensor, lens: torch.Tensor, L: int) -> torch.Tensor:
        """One decode step of rows 0..n-1 from device tensors only: token ids [n], text positions
        [n] and cache lengths [n] (the new key goes at `lens`, the query sees keys 0..lens); `L`
        (host-known, at least max(lens) + 1) is how much of the cache is read. Returns logits
        [n, vocab]. Shapes depend on n and L only, and nothing is read back to the host, so a CUDA
        graph can capture it (runner.py)."""
        n, dev = ids.shape[0], self.device
        x = self.lm.embed_tokens(ids[:, None])
        cos, sin = self.text_cos[0, pos][:, None, None], self.text_sin[0, pos][:, None, None]   # [n, 1, 1, D]
        mask = None if self.use_flash else (torch.arange(L, device=dev)[None] <= lens[:, None])[:, None, None]
        st = _Step(torch.arange(n, device=dev), lens, torch.ones_like(lens), lens[:, None], mask, L, True, True)
        for i in range(len(self.lm.layers)):
            x = self._layer(i, x, cos, sin, st)
        return self.model.lm_head(self._rms(x[:, 0], self.lm.norm.weight)).float()

    @torch.no_grad()
    def forward(self, slots: list[int], chunks: list[list[int]], images: list[list[Image.Image]],
                starts: list[int], positions: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Append one chunk to each listed cache row and return the logits after each chunk's last
        token ([n, vocab]) and the M-RoPE position that follows each chunk.
        `starts` are the rows' cache lengths, `positions` their next M-RoPE positions."""
        ids, pos, nexts, pixels = self._inputs(chunks, images, positions)
        ids, pos = ids.to(self.device, non_blocking=True), pos.to(self.device, non_blocking=True)
        x = self.lm.embed_tokens(ids)
        if pixels is not None:
            pixel_values, grids = pixels
            feats = self.model.model.visual(pixel_values.to(self.device, self.dtype),
                                            grid_thw=grids.to(self.device)).pooler_output
            x = x.masked_scatter((ids == self.processor.image_token_id)[..., None], feats.to(x.dtype))
        if ids.shape[1] == 1 and pixels is None:   # text positions: a table lookup
            cos, sin = self.text_cos[0, pos[0, :, 0]][:, None], self.text_sin[0, pos[0, :, 0]][:, None]
        else:
            cos, sin = self._rope(pos)
        cos, sin = cos[:, None], sin[:, None]                              # [n, 1, T, D]
        st = self._step(slots, chunks, starts)
        for i in range(len(self.lm.layers)):
            x = self._layer(i, x, cos, sin, st)
        last = x[torch.arange(len(slots), device=self.device), st.lens - 1]
        logits = self.model.lm_head(self._rms(last, self.lm.norm.weight))
        return logits.float(), nexts
