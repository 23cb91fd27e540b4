"""How far an exported bundle's answers, from MONAI's runner, agree with the server's infer.

    python -m benchmarks.bundle_agreement --data ../shared/data

Exports the shipped ``hippocampus`` and ``nuclei`` weights (version 0) as bundles, runs
``python -m monai.bundle run`` on the held-out hippocampus test split (40 cases) and the held-out
CPM-15 tiles, and compares each output with the server's infer task (``SegmentationInfer``, as
served: bfloat16 where the CPU has it, and in float32; ``NucleiInfer``) voxel by voxel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from appcore.versions import store_beside
from pathology import export as pathology_export
from pathology.data import HELD_OUT
from pathology.infer import NucleiInfer
from pathology.registry import MODELS as PATHOLOGY
from radiology import export as radiology_export
from radiology.infer import SegmentationInfer
from radiology.registry import MODELS
from research.radiology.splits import msd_cases, split_cases


def run_bundle(bundle: Path, inputs: Path, out: Path) -> None:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--meta_file", "configs/metadata.json", "--bundle_root", str(bundle)]
    command += ["--dataset_dir", str(inputs), "--output_dir", str(out)]
    subprocess.run(command, cwd=bundle, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bundle_agreement."))
    try:
        spec = MODELS["hippocampus"]
        store = store_beside(work / "model" / "hippocampus.pt", "hippocampus", spec.shipped_weights_path)
        bundle = radiology_export.export_bundle(spec, store, 0, work / "hippocampus")
        cases = split_cases(msd_cases(args.data / "hippocampus_mr"))["test"]
        (work / "in").mkdir()
        for case in cases:
            shutil.copyfile(case.image, work / "in" / case.image.name)
        run_bundle(bundle, work / "in", work / "out")
        served = {bf16: SegmentationInfer(spec, [str(spec.shipped_weights_path)], cpu_bf16=bf16) for bf16 in (1, 0)}
        rows = []
        for case in cases:
            exported = np.asarray(nib.load(work / "out" / f"{case.id}_seg.nii.gz").dataobj)
            shares = []
            for task in served.values():
                path, _ = task({"image": str(case.image), "device": "cpu"})
                shares.append(float((np.asarray(nib.load(path).dataobj) == exported).mean()))
                Path(path).unlink()
            rows.append((case.id, exported.size, *shares))
        print("| hippocampus case | voxels | equal to the server (as served) | equal to the server in float32 |")
        print("|---|---|---|---|")
        for image_id, size, bf16, fp32 in rows:
            print(f"| {image_id} | {size} | {bf16:.6f} | {fp32:.6f} |")
        bf16s, fp32s = [r[2] for r in rows], [r[3] for r in rows]
        summary = [f"{min(shares):.6f} / {np.mean(shares):.6f}" for shares in (bf16s, fp32s)]
        print(f"| all {len(rows)}: min / mean | | {summary[0]} | {summary[1]} |")

        nuclei = PATHOLOGY["nuclei"].spec
        store = store_beside(work / "model" / "nuclei.pt", "nuclei", nuclei.shipped_weights_path)
        bundle = pathology_export.export_bundle(nuclei, store, 0, work / "nuclei")
        (work / "tiles").mkdir()
        tiles = [args.data / "pathology" / "nuclei_cpm15" / "images" / f"{t}.png" for t in HELD_OUT]
        for tile in tiles:
            shutil.copyfile(tile, work / "tiles" / tile.name)
        run_bundle(bundle, work / "tiles", work / "tiles_out")
        task = NucleiInfer(nuclei, [str(nuclei.shipped_weights_path)], name="nuclei")
        print("\n| nuclei tile | pixels | nuclei | equal to the server (instance ids) |")
        print("|---|---|---|---|")
        for tile in tiles:
            path, _ = task({"image": str(tile)})
            server = np.asarray(Image.open(path))
            exported = np.asarray(Image.open(work / "tiles_out" / f"{tile.stem}_seg.png"))
            share = float((server == exported).mean()) if server.shape == exported.shape else 0.0
            print(f"| {tile.stem} | {server.size} | {int(server.max())} | {share:.6f} |")
            Path(path).unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
