"""GPU figures of this project's own compute paths, in one process: ``python -m benchmarks.gpu --shared DIR``.

Needs no server (and so no ``monailabel``): it runs the code the server calls, on the first CUDA
device with mixed precision (``--device cpu``: the same figures on the CPU, in float32), on real
volumes from ``DIR`` (the layout of ``../shared/data``):

- ``hippocampus`` infer: pre-processing from the file on disk (load, RAS, 1 mm, z-score) plus the
  sliding window the server uses (``radiology.windows.infer_window``, Gaussian blending), shipped
  weights, test-split volumes;
- ``organs_ct`` infer: the same on the real CT volumes, freshly initialised weights (the cost of a
  forward pass does not depend on the weight values);
- epistemic scoring per hippocampus volume with the server's defaults
  (``radiology.uncertainty.MCDropoutScorer``: 8 dropout passes, 4 test-time augmentations, the
  embedding), from the file on disk;
- training: seconds per step of ``organs_ct`` (batch 2 of its training patches from a real labelled
  CT), forward, backward and AdamW step under autocast with a gradient scaler. Hippocampus seconds
  per epoch come from ``research.radiology.offline``'s history, which times the whole epoch with its loader.

Medians after warm-up, with ``torch.cuda.synchronize`` before every clock read. Writing the
label back to the input grid (``Invertd`` and NIfTI output) is not included. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose

from appcore.weights import load_state_dict
from radiology.registry import MODELS
from radiology.spec import ModelSpec
from radiology.transforms import augment, preprocess
from radiology.uncertainty import MCDropoutScorer
from radiology.windows import OVERLAP, infer_window
from research.radiology.offline import amp_step
from research.radiology.splits import msd_cases, split_cases


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def infer_seconds(
    spec: ModelSpec, network: torch.nn.Module, images: list[Path], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds per volume of (pre-processing + sliding window), and of the sliding window alone."""
    pre = Compose(preprocess(spec, with_label=False))
    network = network.to(device).eval()

    def one(path: Path) -> float:
        x = pre({"image": str(path)})["image"][None].to(device)
        roi = infer_window(
            tuple(x.shape[2:]),
            spec.roi_size,
            overlap=OVERLAP,
            max_scale=spec.max_window_scale,
            multiple=spec.size_multiple,
        )
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            return timed(
                lambda: sliding_window_inference(x, roi, 1, network, overlap=OVERLAP, mode="gaussian").argmax(1),
                device,
            )

    for path in images[:2]:
        one(path)  # warm-up: kernels, cuDNN plans, file cache
    totals, nets = [], []
    for _ in range(repeats):
        for path in images:
            start = time.perf_counter()
            nets.append(one(path))
            totals.append(time.perf_counter() - start)
    return statistics.median(totals), statistics.median(nets)


def scoring_seconds(spec: ModelSpec, images: list[Path], device: torch.device, repeats: int) -> float:
    scorer = MCDropoutScorer(spec, [str(spec.shipped_weights_path)], samples=8, tta_samples=4, device=str(device))
    for path in images[:2]:
        scorer.score(str(path))
    times = [timed(lambda p=path: scorer.score(str(p)), device) for _ in range(repeats) for path in images]
    return statistics.median(times)


def train_step_seconds(spec: ModelSpec, image: Path, label: Path, device: torch.device, steps: int) -> float:
    """Median seconds of one training step (batch 2 of the model's patches) on one real labelled volume."""
    data = Compose(preprocess(spec, with_label=True) + augment(spec))
    network = spec.network().to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    patches = []
    for _ in range(4):
        patches += data({"image": str(image), "label": str(label)})
    batch_image = torch.stack([p["image"] for p in patches[:2]]).as_tensor().to(device)
    batch_label = torch.stack([p["label"] for p in patches[:2]]).as_tensor().to(device)

    def step() -> None:
        amp_step(network, optimizer, scaler, loss_fn, batch_image, batch_label)

    for _ in range(5):
        step()
    return statistics.median(timed(step, device) for _ in range(steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, required=True, help="folder with hippocampus_mr, spleen_ct, totalseg_ct")
    parser.add_argument("--cases", type=int, default=10, help="hippocampus test-split volumes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    hippo = MODELS["hippocampus"]
    cases = split_cases(msd_cases(args.shared / "hippocampus_mr"))["test"][: args.cases]
    mr = [c.image for c in cases]
    ct = [
        args.shared / "spleen_ct" / "imagesTr" / "spleen_2.nii.gz",
        args.shared / "totalseg_ct" / "example_ct_sm.nii.gz",
    ]
    if (args.shared / "totalseg_ct" / "example_ct.nii.gz").exists():
        ct.append(args.shared / "totalseg_ct" / "example_ct.nii.gz")

    hippo_net = hippo.network()
    hippo_net.load_state_dict(load_state_dict(hippo.shipped_weights_path))
    organs = MODELS["organs_ct"]
    rows: list[tuple[str, float, str]] = []
    total, net = infer_seconds(hippo, hippo_net, mr, device, args.repeats)
    rows += [
        ("hippocampus infer, pre-processing + network (s/volume)", total, f"{len(mr)} test MR volumes"),
        ("hippocampus infer, network only (s/volume)", net, "sliding window + argmax"),
    ]
    total, net = infer_seconds(organs, organs.network(), ct, device, args.repeats)
    rows += [
        ("organs_ct infer, pre-processing + network (s/volume)", total, f"{len(ct)} real CT volumes"),
        ("organs_ct infer, network only (s/volume)", net, "sliding window + argmax"),
    ]
    rows.append(
        ("hippocampus epistemic scoring (s/volume)", scoring_seconds(hippo, mr, device, args.repeats), "8 MC + 4 TTA")
    )
    spleen = args.shared / "spleen_ct"
    rows.append(
        (
            "organs_ct training step, batch 2 (s)",
            train_step_seconds(
                organs, spleen / "imagesTr" / "spleen_2.nii.gz", spleen / "labelsTr" / "spleen_2.nii.gz", device, 20
            ),
            f"patch {'x'.join(map(str, organs.roi_size))}",
        )
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    amp = "mixed precision" if device.type == "cuda" else "float32"
    print(f"\n{name}, torch {torch.__version__}, {amp}; medians over {args.repeats} repeats after warm-up\n")
    print("| measure | seconds | note |\n|---|---|---|")
    for label, seconds, note in rows:
        print(f"| {label} | {seconds:.4f} | {note} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "rows": [{"measure": m, "seconds": s, "note": n} for m, s, n in rows],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
