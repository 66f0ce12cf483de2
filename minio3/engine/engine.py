"""The engine: batched multi-turn generation with a KV cache kept across turns.

Every row of the batch is one conversation (a `Slot`, sequence.py). Its tokens go into a
preallocated KV cache once and stay there: the prompt, each generated token, each observation turn
with its crop. Nothing is prefilled twice. `Engine.run` is the loop: admit samples into free slots,
feed each slot what it has not fed yet, choose the next tokens (sampler.py), advance each
conversation (stop strings, tool calls, limits), retire the finished ones. The computing (the
decoder written out over the transformers model's weights, and the cache) is in decoder.py; several
decode steps on the device between reads of the host, in runner.py.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace

import torch
from tqdm import tqdm

from minio3.conversation import IM_END, encode_chunk, image_token_count, prompt_text, tool_turn_text
from minio3.engine.decoder import Decoder
from minio3.engine.runner import DecodeWindow, stop_mask
from minio3.engine.sampler import BANNED_TOKENS, Settings, TokenChooser
from minio3.engine.sequence import Sample, Slot, Trajectory
from minio3.protocol import first_answer


class Engine:
    def __init__(self, model, processor, max_batch: int = 16, max_len: int = 4096, device=None,
                 share_prefix: bool = True):
        """share_prefix: prefill a prompt shared by several new rows once (see `_shared`); off, every
        row prefills its own (the benchmark compares the two)."""
        self.processor, self.tok = processor, processor.tokenizer
        self.share_prefix = share_prefix
        self.max_batch, self.max_len = max_batch, max_len
        self.decoder = Decoder(model, processor, max_batch, max_len, device)
        self.im_end = self.tok.convert_tokens_to_ids(IM_END)
        vocab = self.tok.get_vocab()
        self.banned = torch.tensor([vocab[t] for t in BANNED_TOKENS if t in vocab], dtype=torch.long)
        # the text of every token, to spot stop strings without decoding whole turns each step
        self.pieces = [self.tok.decode([i]) for i in range(len(self.tok))]
        self.prefill_tokens = 0   # statistics for the benchmark
        self.decode_tokens = 0
        self.runner, self.stop_masks = None, {}   # the decode-window runner (runner.py), made when first used

    # ------------------------------------------------------------------------------------------
    # Episodes
    # ------------------------------------------------------------------------------------------
    def run(self, samples: list[Sample], settings: Settings | None = None, progress: bool = True,
            on_text=None, more=None, **changes) -> list[Trajectory]:
        """Play every sample's episode to its end; results come back in the samples' order.
        `settings` (or keyword changes to the defaults, e.g. greedy=True) say how to generate.
        `on_text(sample_index, text)` is called with each piece of the conversation as it grows.
        `more(sample_index, trajectory)` is called as each sample ends and may return new samples:
        they join the same run (numbered after the others) and take the rows that free up."""
        s = replace(settings or Settings(), **changes)
        self.decoder.refresh()   # the model's current weights (RL trains between runs)
        choose = TokenChooser(self.banned, s)
        samples = list(samples)
        waiting = deque(enumerate(samples))
        slots: list[Slot] = []           # slots[i] lives in cache row i
        results: list[Trajectory | None] = [None] * len(samples)
        bar = tqdm(total=len(samples), desc="rollout", disable=not progress, dynamic_ncols=True, leave=False)
        while True:
            while waiting and len(slots) < self.max_batch:   # free rows take waiting samples (`more` adds some)
                slots.append(self._admit(*waiting.popleft(), s, on_text))
            if not slots:
                break
            k = s.window or (8 if self.decoder.device.type == "cuda" else 1)
            if k > 1 and self._windowable(slots, k):
                done = self._window(slots, k, s, choose, on_text)
            else:
                done = self._step(slots, s, choose, on_text)
            for i in sorted(set(done), reverse=True):
                results[slots[i].index] = slots[i].result()
                bar.update(1)
                added = more(slots[i].index, results[slots[i].index]) if more else None
                for extra in added or []:
                    waiting.append((len(samples), extra))
                    samples.append(extra)
                    results.append(None)
                    bar.total += 1
                self._retire(slots, i, waiting, s, on_text)
        bar.close()
        return results

    def forward(self, slots, chunks, images, starts, positions) -> tuple[torch.Tensor, list[int]]:
        """One chunk onto each listed cache row: see `Decoder.forward`."""
        return self.decoder.forward(slots, chunks, images, starts, positions)

    def _step(self, slots: list[Slot], s: Settings, choose: TokenChooser, on_text) -> list[int]:
        """One eager step: feed every slot, choose, advance. Returns the slots that finished."""
        logits = self._feed(slots, s)
        done = [i for i, r in enumerate(slots) if r.traj.over_length]
        order = sorted(logits)
        if order:
            tokens, lps = choose(torch.stack([logits[i] for i in order]), [slots[i].forced_token() for i in order])
            ended = [self._advance(slots[i], t, lp, s, on_text) for i, t, lp in zip(order, tokens, lps)]
            done += [i for i, end in zip(order, ended) if end]
        return done

    def _windowable(self, slots: list[Slot], k: int) -> bool:
        """A decode window needs every slot decoding (nothing to prefill), none scripted, room in the cache."""
        return all(r.pending() == 1 and not r.traj.over_length
                   and (r.sample.forced is None or r.traj.turns >= len(r.sample.forced)) for r in slots) \
            and max(r.length for r in slots) + k < self.max_len

    def _window(self, slots: list[Slot], k: int, s: Settings, choose: TokenChooser, on_text) -> list[int]:
        """k decode steps on the device (runner.DecodeWindow), then the usual per-token bookkeeping
        for the tokens each slot made before it stopped. Returns the slots that finished."""
        if self.runner is None:
            self.runner = DecodeWindow(self.decoder, self.max_batch)
        stops = tuple(sorted(set(s.stop).union(*[r.sample.stop or () for r in slots])))
        if stops not in self.stop_masks:
            self.stop_masks[stops] = stop_mask(self.pieces, stops)
        self.runner.load([r.ids[-1] for r in slots], [r.next_pos for r in slots], [r.length for r in slots],
                         [len(r.turn_ids) for r in slots])
        toks, lps, ran = self.runner.run(len(slots), k, max(r.length for r in slots) + k + 1, choose.choose,
                                         self.stop_masks[stops], self.im_end if s.eos else None,
                                         s.max_turn_tokens, self._max_total(s))
        done = []
        for i, r in enumerate(slots):
            for j in range(k):
                if not ran[j][i]:
                    break
                r.length, r.next_pos = r.length + 1, r.next_pos + 1     # the device fed the pending token
                self.decode_tokens += 1
                if self._advance(r, toks[j][i], lps[j][i], s, on_text):
                    done.append(i)
                    break
                if r.pending() != 1:          # a tool call added an observation turn: the host feeds it
                    break
        return done

    def _admit(self, index: int, sample: Sample, s: Settings, on_text) -> Slot:
        """A new conversation: its prompt (with any few-shot context) waits to be fed."""
        r = Slot(index, sample, self.processor.budget, s.protocol)
        ctx_text, ctx_images = sample.context or ("", [])
        text = prompt_text(sample.question, sample.system or s.protocol.system, ctx_text,
                           image=sample.image is not None)
        images = [self.processor.budget.resize(im) for im in ctx_images] + r.episode.shown[:1]
        r.add(encode_chunk(self.tok, text, [image_token_count(im) for im in images]), images)
        if on_text:
            on_text(index, text)
        return r

    def _retire(self, slots: list[Slot], i: int, waiting: deque, s: Settings, on_text):
        """Free slot i: a waiting sample takes it, or the last slot moves into it (cache row
        included), so that the active rows stay 0..n-1."""
        if waiting:
            slots[i] = self._admit(*waiting.popleft(), s, on_text)
            return
        last = slots.pop()
        if i < len(slots):
            self.decoder.cache.move(len(slots), i, last.length)
            slots[i] = last

    def _feed(self, slots: list[Slot], s: Settings) -> dict[int, torch.Tensor]:
        """Put every slot's unfed tokens through the model; returns the logits of each slot that
        now needs a new token. A new chunk (prompt, observation turn) goes through one prefill of
        those slots; a single sampled token through one decode step of all active slots (the cache
        used in place; a slot with nothing to decode writes a dummy entry past its length, which
        is overwritten later)."""
        for r in slots:
            if len(r.ids) > self._max_total(s):
                r.traj.over_length = True
        live = [i for i, r in enumerate(slots) if not r.traj.over_length]
        pre = [i for i in live if slots[i].pending() > 1]
        dec = [i for i in live if slots[i].pending() == 1]
        logits = {}
        if pre:
            firsts, copies = self._shared(slots, pre) if self.share_prefix else (pre, {})
            fed = [slots[i] for i in firsts]
            out, nexts = self.forward(firsts, [r.ids[r.length:] for r in fed], [r.images for r in fed],
                                      [r.length for r in fed], [r.next_pos for r in fed])
            for j, i in enumerate(firsts):
                r = slots[i]
                self.prefill_tokens += r.pending()
                r.length, r.next_pos, r.images = len(r.ids), nexts[j], []
                logits[i] = out[j]
            for i, j in copies.items():   # the same prompt and picture: the cache row is copied
                self.decoder.cache.move(j, i, slots[j].length)
                slots[i].length, slots[i].next_pos, slots[i].images = slots[j].length, slots[j].next_pos, []
                logits[i] = logits[j]
        if dec:
            out, _ = self.forward(list(range(len(slots))), [r.ids[-1:] for r in slots], [[] for _ in slots],
                                  [r.length for r in slots], [r.next_pos for r in slots])
            for i in dec:
                slots[i].length += 1
                slots[i].next_pos += 1
                logits[i] = out[i]
            self.decode_tokens += len(dec)
        return logits

    @staticmethod
    def _shared(slots: list[Slot], pre: list[int]) -> tuple[list[int], dict[int, int]]:
        """The slots to prefill, and {slot: the slot whose prefill it copies}: new conversations
        with the same prompt tokens over the same picture object (the G rollouts of one question in
        RL) are prefilled once, their picture encoded once."""
        firsts, copies, seen = [], {}, {}
        for i in pre:
            r = slots[i]
            image = r.sample.image
            if r.length == 0 and image is not None and not callable(image) and r.sample.forced is None \
                    and r.sample.context is None:
                key = (id(image), tuple(r.ids))
                if key in seen:
                    copies[i] = seen[key]
                    continue
                seen[key] = i
            firsts.append(i)
        return firsts, copies

    def _advance(self, r: Slot, token: int, logprob: float, s: Settings, on_text) -> bool:
        """Append the chosen token; at the end of a turn carry out its action. True when the
        conversation is over (answered, no action, out of turns, or out of tokens)."""
        r.add([token], sampled=True, logprob=logprob)
        r.turn_ids.append(token)
        r.tail = (r.tail + self.pieces[token])[-64:]
        stops = r.sample.stop if r.sample.stop is not None else s.stop
        if not ((s.eos and token == self.im_end) or any(x in r.tail for x in stops)):
            if len(r.turn_ids) < s.max_turn_tokens and len(r.ids) < self._max_total(s):
                return False
            if len(r.ids) >= self._max_total(s):
                r.traj.over_length = True     # out of context: over-turn masking masks it
            else:
                r.traj.truncated = True       # a rambling turn: no action, no answer
            self._end_turn(r, on_text)
            return True
        action = r.episode.parse(self._end_turn(r, on_text).replace(IM_END, ""))
        if action.kind in ("answer", "none"):
            r.traj.answer, r.traj.answered = action.answer, action.kind == "answer"
            if s.protocol.answer == "first":   # the official extraction: the trajectory's first <answer>
                r.traj.answer = first_answer([t.replace(IM_END, "") for t in r.traj.turn_texts])
                r.traj.answered = r.traj.answer is not None
            return True
        if r.traj.turns >= s.max_turns or len(r.episode.images) >= s.max_images:
            r.traj.exceeded_turns = True      # a tool call on the last allowed turn
            return True
        user, new = r.episode.apply(action)
        chunk = tool_turn_text(user)
        r.add(encode_chunk(self.tok, chunk, [image_token_count(new)] if new else []), [new] if new else [])
        if on_text:
            on_text(r.index, chunk)
        return False

    def _max_total(self, s: Settings) -> int:
        return min(s.max_total_tokens or self.max_len, self.max_len)

    def _end_turn(self, r: Slot, on_text) -> str:
        text = self.tok.decode(r.turn_ids)
        r.end_turn(text)
        if on_text:
            on_text(r.index, text)
        return text
