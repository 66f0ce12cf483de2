"""The engine: batched multi-turn generation with a KV cache kept across turns, and a CLI.

    python infer.py --model tiny-base --image IMG --question "What is ...?" [--max-turns 12] [--greedy]
                    [--json] [--save-inputs inputs.safetensors] [--draw search.png]

Reads: a checkpoint and one image. Writes: the conversation to stdout; with --json the trajectory
as JSON on the last line; --save-inputs / --draw the files named. (The benchmark: `python bench.py`.)

Every row of the batch is one conversation (a `Slot`). Its tokens go into a preallocated KV
cache once and stay there: the prompt, each generated token, each observation turn with its crop.
Nothing is prefilled twice. `Engine.run` is the loop: admit samples into free slots, feed each
slot what it has not fed yet, choose the next tokens, advance each conversation (stop strings,
tool calls, limits), retire the finished ones. The computing (the decoder written out over the
transformers model's weights, and the cache) is in decoder.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import Episode, IM_END, STOP_STRINGS, encode_chunk, image_token_count, prompt_text, tool_turn_text
from data import (InputError, MAX_QUESTION_CHARS, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, load_image,
                  main_cli)
from decoder import Decoder
from runner import DecodeWindow, stop_mask
from model import load, nucleus, pick_device
from protocol import (DEFAULT, Protocol, add_protocol_args, apply_pixels, first_answer, parse_with_preset,
                      protocol_from_args)

# tokens only the processor may write: a sampled <|image_pad|> would claim an image that does not exist
BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


# ----------------------------------------------------------------------------------------------
# What goes in, what comes out, and how to generate
# ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    image: Image.Image | Callable[[], Image.Image] | None   # (a loader: called on admission); None: text only
    question: str
    system: str | None = None               # None: the settings' protocol's system prompt
    forced: list[list[int]] | None = None   # scripted token ids per turn (tests, teacher forcing)
    context: tuple[str, list[Image.Image]] | None = None   # earlier turns (few-shot) and their images
    stop: tuple[str, ...] | None = None    # this row's stop strings (default: the settings')


@dataclass
class Trajectory:
    token_ids: list[int]                 # the whole conversation, prompt included
    sampled_mask: list[bool]             # True where the model produced the token
    logprobs: list[float]                # log p of each sampled token at the sampling temperature (0 elsewhere)
    turn_texts: list[str] = field(default_factory=list)
    crops: list[dict] = field(default_factory=list)
    shown: list[Image.Image] = field(default_factory=list)   # every image as the model saw it
    image_size: tuple[int, int] | None = None                # the original image's (width, height)
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


# ----------------------------------------------------------------------------------------------
# Choosing the next token
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# One conversation in the batch
# ----------------------------------------------------------------------------------------------
class Slot:
    """The state of one conversation: `ids` is the whole conversation so far, of which the first
    `length` tokens are in the cache; the rest (and `images`) wait to be fed."""

    def __init__(self, index: int, sample: Sample, budget, protocol: Protocol = DEFAULT):
        self.index, self.sample = index, sample
        image = sample.image() if callable(sample.image) else sample.image
        self.episode = Episode(image, budget, protocol)
        self.ids: list[int] = []
        self.sampled: list[bool] = []
        self.logprobs: list[float] = []
        self.images: list[Image.Image] = []    # images of the unfed tokens
        self.turn_ids: list[int] = []          # tokens of the assistant turn being generated
        self.tail = ""                         # the end of that turn's text (for stop strings)
        self.traj = Trajectory([], [], [])
        self.length = 0                        # tokens in the cache
        self.next_pos = 0                      # M-RoPE position of the next token to feed

    def add(self, ids: list[int], images: list[Image.Image] = (), sampled: bool = False,
            logprob: float = 0.0):
        self.ids += ids
        self.sampled += [sampled] * len(ids)
        self.logprobs += [logprob] * len(ids)
        self.images += list(images)

    def pending(self) -> int:
        return len(self.ids) - self.length

    def forced_token(self) -> int | None:
        """The scripted token for this point of the current turn, if the sample has one."""
        script = self.sample.forced
        if script and self.traj.turns < len(script) and len(self.turn_ids) < len(script[self.traj.turns]):
            return script[self.traj.turns][len(self.turn_ids)]
        return None

    def end_turn(self, text: str):
        self.traj.turns += 1
        self.traj.turn_texts.append(text)
        self.turn_ids, self.tail = [], ""

    def result(self) -> Trajectory:
        t = self.traj
        t.token_ids, t.sampled_mask, t.logprobs = self.ids, self.sampled, self.logprobs
        t.crops, t.shown, t.tool_errors = self.episode.crops, self.episode.shown, self.episode.errors
        t.image_size = self.episode.images[0].size if self.episode.images else None
        return t


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model, processor, max_batch: int = 16, max_len: int = 4096, device=None):
        self.processor, self.tok = processor, processor.tokenizer
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

    def forward(self, slots, chunks, images, starts, positions) -> tuple[torch.Tensor, list[int]]:
        """One chunk onto each listed cache row: see `Decoder.forward`."""
        return self.decoder.forward(slots, chunks, images, starts, positions)

    # ------------------------------------------------------------------------------------------
    # Episodes
    # ------------------------------------------------------------------------------------------
    def run(self, samples: list[Sample], settings: Settings | None = None, progress: bool = True,
            on_text=None, **changes) -> list[Trajectory]:
        """Play every sample's episode to its end; results come back in the samples' order.
        `settings` (or keyword changes to the defaults, e.g. greedy=True) say how to generate.
        `on_text(sample_index, text)` is called with each piece of the conversation as it grows."""
        s = replace(settings or Settings(), **changes)
        self.decoder.refresh()   # the model's current weights (RL trains between runs)
        choose = TokenChooser(self.banned, s)
        waiting = deque(enumerate(samples))
        slots: list[Slot] = []           # slots[i] lives in cache row i
        results: list[Trajectory | None] = [None] * len(samples)
        bar = tqdm(total=len(samples), desc="rollout", disable=not progress, dynamic_ncols=True, leave=False)
        while waiting and len(slots) < self.max_batch:
            slots.append(self._admit(*waiting.popleft(), s, on_text))
        while slots:
            k = s.window or (8 if self.decoder.device.type == "cuda" else 1)
            if k > 1 and self._windowable(slots, k):
                done = self._window(slots, k, s, choose, on_text)
            else:
                done = self._step(slots, s, choose, on_text)
            for i in sorted(set(done), reverse=True):
                results[slots[i].index] = slots[i].result()
                bar.update(1)
                self._retire(slots, i, waiting, s, on_text)
        bar.close()
        return results

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
            fed = [slots[i] for i in pre]
            out, nexts = self.forward(pre, [r.ids[r.length:] for r in fed], [r.images for r in fed],
                                      [r.length for r in fed], [r.next_pos for r in fed])
            for j, i in enumerate(pre):
                r = slots[i]
                self.prefill_tokens += r.pending()
                r.length, r.next_pos, r.images = len(r.ids), nexts[j], []
                logits[i] = out[j]
        if dec:
            out, _ = self.forward(list(range(len(slots))), [r.ids[-1:] for r in slots], [[] for _ in slots],
                                  [r.length for r in slots], [r.next_pos for r in slots])
            for i in dec:
                slots[i].length += 1
                slots[i].next_pos += 1
                logits[i] = out[i]
            self.decode_tokens += len(dec)
        return logits

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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--model", default="tiny-base",
                    help="tiny | tiny-base | a checkpoint folder | a hub name")
    io.add_argument("--image", required=True)
    io.add_argument("--question", required=True)
    io.add_argument("--json", action="store_true", help="print the trajectory as JSON on the last line")
    io.add_argument("--save-inputs", help="write input_ids, pixel_values, image_grid_thw (safetensors)")
    io.add_argument("--draw", help="save the image with the zoom boxes numbered")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--max-turns", type=POSITIVE, default=12)
    gen.add_argument("--max-turn-tokens", type=POSITIVE, default=512)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0)
    gen.add_argument("--top-p", type=PROBABILITY, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-total-tokens", type=POSITIVE, default=8192, help="the whole conversation")
    gen.add_argument("--max-images", type=POSITIVE, default=32, help="the original and its crops")
    add_protocol_args(ap)
    return parse_with_preset(ap, argv)


def check_args(args):
    """Everything the CLI reads or writes, checked before the model runs."""
    if len(args.question) > MAX_QUESTION_CHARS:
        raise InputError(f"--question has {len(args.question)} characters (at most {MAX_QUESTION_CHARS})")
    for name in (args.save_inputs, args.draw):
        if name and not Path(name).resolve().parent.is_dir():
            raise InputError(f"{name}: its folder does not exist")
    return load_image({"images": [str(Path(args.image).resolve())], "doc_id": "--image"}, ".")


def main(argv=None):
    args = parse_args(argv)
    image = check_args(args)
    protocol = protocol_from_args(args)
    model, processor = load(args.model, device=pick_device())
    apply_pixels(processor, args)
    out = sys.stderr if args.json else sys.stdout
    settings = Settings(max_turns=args.max_turns, greedy=args.greedy, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, max_turn_tokens=args.max_turn_tokens,
                        max_total_tokens=args.max_total_tokens, max_images=args.max_images, protocol=protocol)
    show = lambda i, text: print(text.replace("<|image_pad|>", ""), end="", file=out, flush=True)
    traj = Engine(model, processor, max_batch=1, max_len=args.max_total_tokens).run([Sample(image, args.question)], settings, progress=False,
                                                     on_text=show)[0]
    print(f"\n\nanswer: {traj.answer!r}  turns: {traj.turns}  zooms: {len(traj.crops)}  tool errors: "
          f"{traj.tool_errors}  exceeded: {traj.exceeded}", file=out)
    if args.json:       # the result first, then the files
        print(json.dumps(traj.to_json()))
    if args.save_inputs:
        from safetensors.torch import save_file
        pixel_values, grids = processor.pixels(traj.shown)
        save_file({"input_ids": torch.tensor([traj.token_ids]), "pixel_values": pixel_values.contiguous(),
                   "image_grid_thw": grids.contiguous()}, args.save_inputs)
    if args.draw:
        draw_search(image, traj.crops, args.draw)


if __name__ == "__main__":
    main_cli(main)
