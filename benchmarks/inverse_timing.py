"""Infer time and peak memory, the inversion by indexing (now) against MONAI's ``Invertd`` with the
image decoded as float32 (before): ``python -m benchmarks.inverse_timing --help``.

Each case runs ``radiology.infer.SegmentationInfer`` in a fresh process per variant and repeat
(alternating, so that load on the machine hits both alike), on the CPU; ``organs_ct`` gets random
weights (the cost of a forward pass does not depend on them). Prints a Markdown table of median
seconds and of the peak resident memory a run added to the loaded process (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
import torch
from monai.transforms import Compose, EnsureTyped, Invertd, LoadImaged
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from radiology.transforms import CompactDtyped

model, image, weights, variant = sys.argv[1:5]
torch.set_num_threads(2)
task = SegmentationInfer(MODELS[model], [weights])
if variant == "before":
    pre = [t for t in task._pre if not isinstance(t, CompactDtyped)]
    pre[0] = LoadImaged(keys="image", image_only=True)
    pre[2] = EnsureTyped(keys="image", dtype="float32", track_meta=True)
    task._pre = pre
    task._invert = Invertd(keys="pred", transform=Compose(pre), orig_keys="image", nearest_interp=True)
task._get_network("cpu", {})
def status(key):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)).split()[1])
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
started = time.perf_counter()
out, _ = task({"image": image, "device": "cpu", "logging": "WARNING"})
took = time.perf_counter() - started
Path(out).unlink()
print(json.dumps({"seconds": took, "added_mb": (status("VmHWM") - base) / 1024}))
"""


def run_case(model: str, image: Path, weights: Path, variant: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(image), str(weights), variant], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{model} on {image.name} ({variant}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks.attacks import routine_ct
    from radiology.registry import MODELS
    from tests.conftest import HIPPO, SPLEEN, TOTALSEG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-routine-ct", action="store_true", help="leave out the 512 x 512 x 300 CT")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="inverse-timing-") as tmp:
        random_weights = Path(tmp) / "organs_ct.pt"
        torch.manual_seed(0)
        torch.save(MODELS["organs_ct"].network().state_dict(), random_weights)
        hippo = Path(MODELS["hippocampus"].shipped_weights_path)
        cases = [
            ("hippocampus", HIPPO / "imagesTr" / "hippocampus_001.nii.gz", hippo),
            ("organs_ct", SPLEEN / "imagesTr" / "spleen_2.nii.gz", random_weights),
            ("organs_ct", TOTALSEG / "example_ct.nii.gz", random_weights),
        ]
        if not args.no_routine_ct:
            cases.append(("organs_ct", routine_ct(Path(tmp) / "routine_ct_512x512x300.nii.gz"), random_weights))
        print("| model | image | before: s | now: s | before: peak added (MB) | now: peak added (MB) |")
        print("|---|---|---|---|---|---|")
        for model, image, weights in cases:
            runs: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
            for _ in range(args.repeats):
                for variant in runs:
                    runs[variant].append(run_case(model, image, weights, variant))
            sec = {v: statistics.median(r["seconds"] for r in rs) for v, rs in runs.items()}
            mem = {v: statistics.median(r["added_mb"] for r in rs) for v, rs in runs.items()}
            print(
                f"| {model} | {image.name} | {sec['before']:.2f} | {sec['now']:.2f} | {mem['before']:.0f} | "
                f"{mem['now']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
