"""Combine separately trained networks into the one file a model serves (``radiology.ensemble``)::

    python -m research.radiology.combine hippocampus --out radiology/weights/hippocampus.pt \\
        --float16 a.pt b.pt c.pt d.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from appcore.weights import load_state_dict, save_weights_atomically
from radiology.ensemble import members_in
from radiology.registry import MODELS


def combine(states: Sequence[dict[str, torch.Tensor]], *, float16: bool = False) -> dict[str, torch.Tensor]:
    """One ensemble state dict from the plain state dicts of its members, in order."""
    if len(states) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(states)}")
    for i, state in enumerate(states):
        if members_in(state) != 1:
            raise ValueError(f"member {i} is itself an ensemble")
        if set(state) != set(states[0]):
            raise ValueError(f"member {i} has other tensors than member 0: not the same network")
    out = {}
    for i, state in enumerate(states):
        for key, value in state.items():
            value = value.detach().cpu()
            out[f"members.{i}.{key}"] = value.half() if float16 and value.is_floating_point() else value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("members", type=Path, nargs="+", help="weights of one network each, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--float16", action="store_true", help="store the weights in float16 (half the size)")
    args = parser.parse_args(argv)
    model = MODELS[args.model]
    try:
        states = [load_state_dict(p) for p in args.members]
        state = combine(states, float16=args.float16)
        # The result must load into the model's architecture with this many members, exactly.
        dataclasses.replace(model, members=len(states)).network().load_state_dict(state, strict=True)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, RuntimeError) as e:  # unreadable or unfit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.error(f"cannot combine these weights for {args.model}: {first}")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the file to write")
    save_weights_atomically(state, args.out)
    size = args.out.stat().st_size / 1e6
    print(f"{args.out}: {len(states)} members of {args.model}, {size:.1f} MB")
    if len(states) != model.members:
        print(
            f"note: {args.model} serves {model.members} network(s) (ModelSpec.members): the server refuses this "
            "file; research.radiology.evaluate reads any count"
        )


if __name__ == "__main__":
    main()
