"""What goes into the engine and what comes out: a `Sample` (an image and a question), a
`Trajectory` (the whole conversation with its sampled tokens, their log-probabilities, the crops and
how the episode ended), and a `Slot`, the state of one conversation while it occupies a row of the
batch and of the KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from minio3.conversation import Episode
from minio3.protocol import DEFAULT, Protocol


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
