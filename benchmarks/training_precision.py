"""Server training on this CPU, float32 against bfloat16: ``python -m benchmarks.training_precision --help``.

``/train`` runs MONAI's ``SupervisedTrainer``, which autocasts on CUDA only; on the CPU the app's
trainer runs its forward passes in bfloat16 where the CPU computes it natively (``--conf cpu_bf16``,
``radiology.train.CpuForward``). This prints, through the app's own ``RadiologyApp.train``:

- seconds per epoch (whole run over its epochs, set-up included) for ``hippocampus`` on
  ``--speed-cases`` real volumes and ``organs_ct`` on one real CT with its TotalSegmentator labels
  mapped onto the model's, the two precisions alternating run by run;
- with ``--step-only``, instead: seconds of one training step of the shipped hippocampus network on
  4 real training volumes, in each precision with torch's and with NumPy's dropout masks, and the
  class map of a score tensor by ``torch.argmax`` against ``radiology.transforms.class_index``;
- whether training learns as well: ``hippocampus`` trained from scratch in each precision on the
  first ``--learn-cases`` training-split cases, for each seed, then scored on the held-out test split
  (inference in float32 for both, so only the training differs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import SimpleInferer
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from monailabel.config import settings as ml_settings

from appcore.precision import cpu_has_native_bf16
from benchmarks.radiology import labelled_app
from radiology.registry import MODELS
from radiology.train import CpuForward
from radiology.transforms import class_index
from radiology.uncertainty import torch_seeded_rng
from research.radiology.evaluate import evaluate
from research.radiology.label_mapping import load_class_map, remap_by_name
from research.radiology.offline import batched_data
from research.radiology.splits import Case, msd_cases, split_cases

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"float32": "false", "bfloat16": "true"}  # name -> --conf cpu_bf16


def train(
    root: Path, model: str, pairs: list[tuple[Path, Path]], precision: str, epochs: int, **request
) -> tuple[float, Path]:
    """Trains through ``app.train``; seconds per epoch and the published weights."""
    app = labelled_app(root, model, pairs, {"cpu_bf16": PRECISIONS[precision]})
    start = time.perf_counter()
    app.train(
        {"model": model, "max_epochs": epochs, "train_batch_size": 4, "val_split": 0.0, "device": "cpu", **request}
    )
    return (time.perf_counter() - start) / epochs, app.published_weights(model)


def organs_ct_pair(shared: Path, into: Path) -> tuple[Path, Path]:
    """The small TotalSegmentator CT and its labels mapped onto ``organs_ct``'s ids."""
    source = shared / "totalseg_ct"
    seg = nib.load(source / "example_seg.nii.gz")
    mapped = remap_by_name(
        np.asarray(seg.dataobj), load_class_map(source / "class_map.json"), MODELS["organs_ct"].labels
    )
    label = into / "example_ct_sm_label.nii.gz"
    nib.save(nib.Nifti1Image(mapped.astype(np.uint8), seg.affine), label)
    return source / "example_ct_sm.nii.gz", label


def step_table(shared: Path, repeats: int) -> list[str]:
    """Markdown rows: one optimiser step per precision and mask source, and argmax against class_index."""
    spec = MODELS["hippocampus"]
    splits = split_cases(msd_cases(shared / "hippocampus_mr"))
    images, labels, _ = batched_data(spec, splits["train"][:4], splits["val"][:1], torch.device("cpu"))
    network = spec.network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rows = []
    for precision, flag in PRECISIONS.items():
        for masks in ("torch", "NumPy"):
            forward = CpuForward(
                SimpleInferer(), cpu_bf16=flag == "true", rng=None if masks == "torch" else torch_seeded_rng()
            )
            times = []
            for r in range(repeats + 1):
                network.train()
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss_fn(forward(images, network), labels).backward()
                optimizer.step()
                if r:  # the first step warms up oneDNN
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            shape = tuple(images.shape[2:])
            rows.append(
                f"| training step, {precision}, {masks} masks | {median:.3f} s "
                f"| batch 4 of {shape}, median of {repeats} |"
            )
    with torch.inference_mode():
        logits = network.eval()(images[:1])[0]
        scores = {
            f"hippocampus logits {tuple(logits.shape)}": logits,
            "a 10-class organs_ct output (10, 183, 152, 112), random values": torch.randn(10, 183, 152, 112),
        }
        for name, x in scores.items():
            for how, fn in (("torch.argmax", lambda t: torch.argmax(t, 0, keepdim=True)), ("class_index", class_index)):
                fn(x)
                start = time.perf_counter()
                for _ in range(repeats):
                    fn(x)
                ms = (time.perf_counter() - start) / repeats * 1000
                rows.append(f"| class map of {name}, {how} | {ms:.1f} ms | mean of {repeats} |")
    return rows


def speed(scratch: Path, model: str, pairs: list[tuple[Path, Path]], epochs: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(repeats):
        for precision in PRECISIONS:
            seconds, _ = train(scratch / f"{model}-{precision}-{r}", model, pairs, precision, epochs)
            times[precision].append(seconds)
    return {p: statistics.median(t) for p, t in times.items()}


def learning(scratch: Path, train_cases: list[Case], test: list[Case], epochs: int, seeds: list[int]) -> dict:
    """Held-out Dice of ``hippocampus`` trained from scratch in each precision, per seed."""
    pairs = [(c.image, c.label) for c in train_cases]
    out: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for seed in seeds:
        for precision in PRECISIONS:
            set_determinism(seed=seed)
            # No served or shipped weights to start from: the trainer starts from initialised ones.
            _, weights = train(
                scratch / f"learn-{precision}-{seed}", "hippocampus", pairs, precision, epochs, pretrained=False
            )
            out[precision].append(evaluate("hippocampus", weights, test, cpu_bf16=False))
    set_determinism(seed=None)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--speed-cases", type=int, default=10, help="labelled hippocampus volumes in the timed runs")
    parser.add_argument("--speed-epochs", type=int, default=6)
    parser.add_argument("--ct-epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per precision and model")
    parser.add_argument("--learn-cases", type=int, default=20, help="training-split cases for the learning check")
    parser.add_argument("--learn-epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--step-only", action="store_true", help="only time one training step and the class map")
    args = parser.parse_args(argv)
    if not cpu_has_native_bf16():
        parser.exit(1, "this CPU has no native bfloat16 (AMX or AVX512-BF16): the app keeps float32 here\n")
    torch.set_num_threads(args.threads)
    ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False  # no file watcher on a temporary folder
    load = os.getloadavg()[0]
    cpu = platform.processor() or platform.machine()
    machine = f"machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads; load average before: {load:.2f}"
    if args.step_only:
        rows = step_table(args.shared, repeats=15)
        print(machine)
        print("| measure | time | note |\n|---|---|---|")
        print("\n".join(rows))
        return
    splits = split_cases(msd_cases(args.shared / "hippocampus_mr"))
    with tempfile.TemporaryDirectory(prefix="training-precision-") as tmp:
        scratch = Path(tmp)
        timed = [(c.image, c.label) for c in splits["train"][: args.speed_cases]]
        hippo = speed(scratch, "hippocampus", timed, args.speed_epochs, args.repeats)
        ct = speed(scratch, "organs_ct", [organs_ct_pair(args.shared, scratch)], args.ct_epochs, args.repeats)
        learned = learning(scratch, splits["train"][: args.learn_cases], splits["test"], args.learn_epochs, args.seeds)

    print(machine)
    print("| measure | float32 | bfloat16 | note |\n|---|---|---|---|")
    note = f"median of {args.repeats} runs"
    print(
        f"| training hippocampus, s/epoch | {hippo['float32']:.2f} | {hippo['bfloat16']:.2f} | "
        f"{len(timed)} volumes, batch 4, {args.speed_epochs} epochs incl. set-up, {note} |"
    )
    print(
        f"| training organs_ct, s/epoch | {ct['float32']:.2f} | {ct['bfloat16']:.2f} | "
        f"1 CT (122x101x30 @ 3 mm), {args.ct_epochs} epochs incl. set-up, {note} |"
    )
    for i, seed in enumerate(args.seeds):
        cells = [learned[p][i] for p in PRECISIONS]
        means = " | ".join(f"{r['mean_of_classes']:.4f}" for r in cells)
        per_class = " / ".join(" ".join(f"{v:.3f}" for v in r["mean_dice"].values()) for r in cells)
        print(
            f"| Dice from scratch, seed {seed} | {means} | "
            f"{args.learn_cases} training cases, {args.learn_epochs} epochs; {len(splits['test'])} test cases; "
            f"anterior posterior {per_class} |"
        )
    means = {p: float(np.mean([r["mean_of_classes"] for r in learned[p]])) for p in PRECISIONS}
    print(f"| Dice from scratch, mean of seeds | {means['float32']:.4f} | {means['bfloat16']:.4f} | |")


if __name__ == "__main__":
    main()
