"""Stage 4: one question, one image, the search played out in the terminal.

    python infer.py                          # run_tiny's RL model on the first test question
    python infer.py --index 7 --temperature 0.7 --draw search.png   # sampled, the zooms drawn
    python infer.py --model runs/tiny/sft --image IMG --question Q
    python infer.py --model Mini-o3/Mini-o3-7B-v1 --preset mini-o3 --image IMG --question Q

Reads: a checkpoint (default: run_tiny's RL model) and one image. Writes: the conversation to
stdout as it grows; with --json the trajectory as JSON on the last line; --save-inputs / --draw
the files named.

What to watch: each assistant turn is a thought and one action, a zoom (<grounding> with a box) or
an answer (<answer>); after a zoom the engine crops the box out of the original picture, resizes it
to the pixel budget and feeds it back as the next user turn. The engine that plays the search,
batched for the other stages, is minio3/engine (`Engine.run`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minio3.data import (InputError, MAX_QUESTION_CHARS, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, load_image,
                         main_cli, read_records)
from minio3.engine import Engine, Sample, Settings
from minio3.model import load, pick_device
from minio3.plots import draw_search
from minio3.protocol import add_protocol_args, apply_pixels, parse_with_preset, protocol_from_args


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--model", default="runs/tiny/rl",
                    help="a checkpoint folder | tiny-base (the committed base) | tiny (random) | a hub name")
    io.add_argument("--image", help="the picture (default: the --index'th question of --data)")
    io.add_argument("--question", help="what to find in it (with --image)")
    io.add_argument("--data", default="runs/tiny/probe/test.jsonl", help="probe records, used without --image")
    io.add_argument("--index", type=NONNEGATIVE, default=0, help="which record of --data")
    io.add_argument("--json", action="store_true", help="print the trajectory as JSON on the last line")
    io.add_argument("--save-inputs", help="write input_ids, pixel_values, image_grid_thw (safetensors)")
    io.add_argument("--draw", help="save the image with the zoom boxes numbered")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--max-turns", type=POSITIVE, default=12)
    gen.add_argument("--max-turn-tokens", type=POSITIVE, default=512)
    gen.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=0.0,
                     help="0: greedy decoding (the default); above 0: sampling at this temperature")
    gen.add_argument("--greedy", action="store_const", const=0.0, dest="temperature", help="the same as --temperature 0")
    gen.add_argument("--top-p", type=PROBABILITY, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-total-tokens", type=POSITIVE, default=8192, help="the whole conversation")
    gen.add_argument("--max-images", type=POSITIVE, default=32, help="the original and its crops")
    add_protocol_args(ap)
    return parse_with_preset(ap, argv)


def check_args(args):
    """Everything the CLI reads or writes, checked before the model runs; returns the image (and,
    without --image, sets --question from the --index'th record of --data)."""
    if (args.image is None) != (args.question is None):
        raise InputError("give --image and --question together (or neither: a question of --data)")
    if args.image is None:
        rows = read_records(args.data)
        if args.index >= len(rows):
            raise InputError(f"{args.data}: --index {args.index}, but the file holds {len(rows)} records")
        args.question = rows[args.index]["problem"]
        return load_image(rows[args.index], Path(args.data).parent)
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
    settings = Settings(max_turns=args.max_turns, greedy=args.temperature == 0, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, max_turn_tokens=args.max_turn_tokens,
                        max_total_tokens=args.max_total_tokens, max_images=args.max_images, protocol=protocol)
    show = lambda i, text: print(text.replace("<|image_pad|>", ""), end="", file=out, flush=True)
    engine = Engine(model, processor, max_batch=1, max_len=args.max_total_tokens)
    traj = engine.run([Sample(image, args.question)], settings, progress=False, on_text=show)[0]
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
