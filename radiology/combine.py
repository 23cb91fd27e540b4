"""Combine independently trained member weights into one ensemble file: ``python -m radiology.combine --help``."""

from __future__ import annotations

import argparse
from pathlib import Path

from radiology.networks import ensemble_state_dict
from radiology.weights import load_state_dict, save_weights_atomically


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("members", type=Path, nargs="+", help="weights of each member, in order")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    save_weights_atomically(ensemble_state_dict([load_state_dict(p) for p in args.members]), args.out)
    print(f"wrote {args.out} ({len(args.members)} members)")


if __name__ == "__main__":
    main()
