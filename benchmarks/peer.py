"""Side by side with MONAI Label 0.8.5's sample radiology app, same volumes, same run: ``python -m benchmarks.peer``.

The sample app is copied from the installed wheel (``<venv>/monailabel/sample-apps/radiology``) into a
temporary folder at run time, never into this repository, and started with the workarounds of
``WORKAROUNDS``. The two apps take turns (sample, ours, sample, ours, ...) so that the load of the
shared machine falls on both alike, and the table gives medians of every repeat and the ratio
``ours / sample`` (below 1: this project is faster or smaller).

Neither app has trained CT weights here (the sample's download is switched off, ``organs_ct`` ships
untrained), so both CT networks run with freshly initialised weights: the cost of a forward pass does
not depend on the weight values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import torch

from benchmarks.radiology import (
    ROOT,
    SERVER_CONF,
    PeakRSS,
    copy_project_app,
    free_port,
    median,
    start_server,
    stop_server,
    train_child,
    wait_for_info,
)

SAMPLE_SOURCE = Path(sys.prefix) / "monailabel" / "sample-apps" / "radiology"
SAMPLE_MODEL = "segmentation_spleen"
SAMPLE, OURS, BEFORE = "sample", "ours", "before"
# Which model of each app answers which kind of volume.
INFER_MODELS = {SAMPLE: {"CT": SAMPLE_MODEL, "MR": SAMPLE_MODEL}, OURS: {"CT": "organs_ct", "MR": "hippocampus"}}
# The sample's epistemic config (``lib/configs/segmentation_spleen.py``): its default 5 samples, dropout 0.2.
SAMPLE_EPISTEMIC_SAMPLES = 5
TRAIN_EPOCHS = 3


@dataclass(frozen=True)
class Workaround:
    """One thing the sample app needs to run on this machine, and what it says about the sample app.

    Args:
        finding: what goes wrong without it.
        conf: ``--conf`` pairs that avoid it.
        env: environment variables that avoid it.
        action: what the harness does instead, where neither helps.
    """

    finding: str
    conf: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    action: str = ""

    def how(self) -> str:
        settings = [f"`--conf {k} {v}`" for k, v in self.conf] + [f"`{k}={v}`" for k, v in self.env]
        return " ".join(settings) or self.action


WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround(
        "`segmentation_spleen` downloads pretrained weights from GitHub while the app is constructed "
        "(`TaskConfig.init`), so the server does not start without internet",
        conf=(("use_pretrained_model", "false"),),
    ),
    Workaround(
        "SAM2 infers are on by default (`--conf sam2 true`); the `sam2` package they need is a source build "
        "that downloads a multi-GB CUDA torch, and its checkpoints are downloaded at start",
        conf=(("sam2", "false"),),
    ),
    Workaround(
        "the scribbles infers (on by default) import `numpymaxflow`, which is not among monailabel 0.8.5's "
        "requirements: start-up fails with `ModuleNotFoundError: numpymaxflow`",
        conf=(("scribbles", "false"),),
    ),
    Workaround(
        "training defaults to MLflow tracking (`MONAI_LABEL_TRACKING_ENABLED=true`); mlflow is not installed "
        "(it is left out of monailabel's dependencies here because current MLflow refuses the plain file "
        "store MONAI Label points it at), so training fails unless tracking is switched off",
        env=(("MONAI_LABEL_TRACKING_ENABLED", "false"),),
    ),
    Workaround(
        "the `segmentation_spleen` trainer crops 96^3 patches at 1 mm without padding, so a volume less than "
        "96 mm deep (`totalseg_ct/example_ct_sm`, 90 mm) reaches the UNet at a size its skips cannot join: "
        "`RuntimeError: Sizes of tensors must match` and the training run dies",
        action="train both apps on labelled volumes at least 96 mm on every axis "
        "(`spleen_ct/spleen_2`, `totalseg_ct/chest_aorta`)",
    ),
    Workaround(
        "the versions matter: pydicom 3 breaks its DICOM SEG code (pydicom-seg) and MONAI 1.6 breaks its use of "
        "`Spacingd`; `monailabel==0.8.5` is installed with `--no-deps` because its metadata pulls sam2 and mlflow",
        action="the harness checks `monailabel==0.8.5`, `monai==1.5.2`, `pydicom==2.4.4` before it starts",
    ),
    Workaround(
        "its infer tasks import `monailabel.transform.post`, which imports torchvision; the only torchvision that "
        "imports here sits beside the CUDA build of torch (2.14.1), about 290 MB more resident memory per process "
        "and 5 GB more disk than the CPU build this project installs on machines without an NVIDIA driver",
        action="the harness runs the sample app with `--sample-python`, an environment made by "
        "`make venv VENV=../venv-cuda TORCH=cuda`, and checks that it imports torchvision",
    ),
)

# Versions the sample app needs (see the last workaround); checked, never changed, by the harness.
PINS: dict[str, str] = {"monailabel": "0.8.5", "monai": "1.5.2", "pydicom": "2.4.4"}


def sample_conf() -> dict[str, str]:
    """``--conf`` of the sample app: its spleen model and every workaround."""
    conf = {"models": SAMPLE_MODEL}
    for w in WORKAROUNDS:
        conf.update(w.conf)
    return conf


def sample_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for w in WORKAROUNDS:
        env.update(w.env)
    return env


def check_pins(installed: Callable[[str], str] = version) -> None:
    """Raise if a package the sample app depends on is not at the version it needs."""
    wrong = {name: installed(name) for name in PINS if installed(name) != PINS[name]}
    if wrong:
        raise RuntimeError(f"The sample app needs {PINS}; installed: {wrong}. See README 'Versions that matter'")


def torch_versions(python: str) -> str:
    """``torch X, torchvision Y`` (or ``none``) as the environment of ``python`` has them."""
    code = (
        "import importlib.metadata as m\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'none'\n"
        "print(f\"torch {v('torch')}, torchvision {v('torchvision')}\")"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return result.stdout.strip() or f"unknown: {result.stderr.strip()[-200:]}"


def check_sample_python(python: str) -> None:
    """Raise, saying what to do, if the sample app cannot import in ``python``'s environment."""
    result = subprocess.run(
        [python, "-c", "import torchvision, monailabel.transform.post"], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"The sample app cannot run with {python}: MONAI Label's `transform.post`, which its infer tasks use, "
            "imports torchvision, and this environment's torchvision does not import "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no output'}). "
            "Make an environment with the CUDA torch (`make venv VENV=../venv-cuda TORCH=cuda`) and pass "
            "`--sample-python ../venv-cuda/bin/python`."
        )


def copy_sample_app(dest: Path, source: Path = SAMPLE_SOURCE) -> Path:
    """A clean copy of the sample app at ``dest`` (never inside this repository)."""
    if not (source / "main.py").exists():
        raise FileNotFoundError(f"No MONAI Label sample app at {source}; install monailabel==0.8.5 into .venv")
    if ROOT in dest.resolve().parents:
        raise ValueError(f"Refusing to copy the sample app into this repository ({dest})")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "model", "logs"))
    return dest


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    measure: str
    unit: str
    sample: float
    ours: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return ratio(self.ours, self.sample)


def ratio(ours: float, sample: float) -> float:
    """``ours / sample``; NaN where either is missing or the sample's figure is zero."""
    if not (np.isfinite(ours) and np.isfinite(sample)) or sample == 0:
        return float("nan")
    return ours / sample


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}"


def format_table(rows: Iterable[Row]) -> str:
    lines = ["| measure | unit | sample app | this project | ratio (ours/sample) | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio_text = "n/a" if not np.isfinite(r.ratio) else f"{r.ratio:.2f}x"
        lines.append(f"| {r.measure} | {r.unit} | {_fmt(r.sample)} | {_fmt(r.ours)} | {ratio_text} | {r.note} |")
    return "\n".join(lines)


def child_value(output: str, key: str) -> list[float]:
    """Values of ``KEY value`` lines a child process printed."""
    return [float(line.split()[1]) for line in output.splitlines() if line.startswith(key + " ")]


def same_geometry(output: Path, source: Path, atol: float = 1e-3) -> bool:
    """Whether ``output`` lies on ``source``'s voxel grid: same shape and voxel-to-world affine."""
    out, src = nib.load(output), nib.load(source)
    return tuple(out.shape[:3]) == tuple(src.shape[:3]) and np.allclose(out.affine, src.affine, atol=atol)


def _shape(path: Path) -> str:
    img = nib.load(path)
    return "x".join(str(n) for n in img.shape[:3]) + " @ " + "x".join(f"{z:g}" for z in img.header.get_zooms()[:3])


def _image_id(path: Path) -> str:
    return path.name.split(".")[0]


def _load() -> float:
    return os.getloadavg()[0]


# -- servers: start-up, infer, memory -----------------------------------------------------------


@dataclass
class ServerFigures:
    startup: list[float] = dataclasses.field(default_factory=list)
    infer: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    geometry_ok: dict[str, bool] = dataclasses.field(default_factory=dict)
    peak_rss: float = 0.0


def _serve_once(
    who: str,
    app_dir: Path,
    studies: Path,
    volumes: Mapping[str, list[Path]],
    figures: ServerFigures,
    log: Path,
    pythonpath: Path | None = None,
    python: str = sys.executable,
) -> None:
    conf, env = (sample_conf(), sample_env()) if who == SAMPLE else (SERVER_CONF, {})
    if pythonpath is not None:  # this project's code from another tree (``--before``)
        env = {**env, "PYTHONPATH": str(pythonpath)}
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(app_dir, studies, port, log, conf, env, python)
    try:
        with PeakRSS(proc.pid) as mem, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800) as client:
            wait_for_info(client, proc, log)
            figures.startup.append(time.perf_counter() - t0)
            first = True
            for kind, paths in volumes.items():
                model = INFER_MODELS[SAMPLE if who == SAMPLE else OURS][kind]
                for path in paths:
                    if first:  # the first call also builds the network: warm up, untimed
                        client.post(f"/infer/{model}", params={"image": _image_id(path)}).raise_for_status()
                        first = False
                    t = time.perf_counter()
                    resp = client.post(f"/infer/{model}", params={"image": _image_id(path), "output": "image"})
                    resp.raise_for_status()
                    figures.infer.setdefault(path.name, []).append(time.perf_counter() - t)
                    out = log.parent / f"{who}-{path.name}"
                    out.write_bytes(resp.content)
                    ok = same_geometry(out, path)
                    figures.geometry_ok[path.name] = figures.geometry_ok.get(path.name, True) and ok
        figures.peak_rss = max(figures.peak_rss, mem.peak)
    finally:
        stop_server(proc)


# -- training and scoring children --------------------------------------------------------------


def _import_sample_main(app_dir: Path) -> Any:
    sys.path.insert(0, str(app_dir))
    import main as sample_main  # the sample app's main.py, from the temporary copy

    return sample_main


def sample_train_child(app_src: Path, pairs: list[str], epochs: int) -> None:
    """Child: the sample app, constructed as its server does, trained in-process on the pairs."""
    root = Path(tempfile.mkdtemp(prefix="peer-train-"))
    app_dir, studies = copy_sample_app(root / "app", app_src), root / "studies"
    studies.mkdir()
    images, labels = [Path(p) for p in pairs[0::2]], pairs[1::2]
    for image in images:
        shutil.copyfile(image, studies / image.name)
    app = _import_sample_main(app_dir).MyApp(str(app_dir), str(studies), sample_conf())
    for image, label in zip(images, labels, strict=True):
        app.datastore().save_label(_image_id(image), label, "final", {})
    start = time.perf_counter()
    app.train({"model": SAMPLE_MODEL, "max_epochs": epochs, "val_split": 0.0})
    print("EPOCH_SECONDS", (time.perf_counter() - start) / epochs, flush=True)
    shutil.rmtree(root, ignore_errors=True)


def ours_train_child(pairs: list[str], epochs: int, roi: tuple[int, ...] | None, samples: int | None, batch: int):
    """Child: this project's ``organs_ct`` training, optionally at another patch size and patch count."""
    from radiology.registry import MODELS

    changes: dict[str, Any] = {}
    if roi:
        changes["roi_size"] = roi
    if samples:
        changes["samples_per_image"] = samples
    MODELS["organs_ct"] = dataclasses.replace(MODELS["organs_ct"], **changes)
    train_child("organs_ct", pairs, {"max_epochs": epochs, "train_batch_size": batch})


def sample_score_child(app_src: Path, images: list[str]) -> None:
    """Child: MONAI Label's ``epistemic_v2`` scoring over the sample's spleen infer task, with dropout 0.2."""
    from monai.networks.nets import UNet
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring

    root = Path(tempfile.mkdtemp(prefix="peer-score-"))
    app_dir, studies = copy_sample_app(root / "app", app_src), root / "studies"
    studies.mkdir()
    for image in images:
        shutil.copyfile(image, studies / Path(image).name)
    _import_sample_main(app_dir)
    import lib.infers  # the sample's own infer tasks

    # The dropout network of the sample's epistemic config; train mode keeps dropout sampling.
    network = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch", dropout=0.2)
    model_dir = app_dir / "model"
    paths = [str(model_dir / f"pretrained_{SAMPLE_MODEL}.pt"), str(model_dir / f"{SAMPLE_MODEL}.pt")]
    task = lib.infers.SegmentationSpleen(path=paths, network=network, train_mode=True, skip_writer=True)
    scoring = EpistemicScoring(task, simulation_size=SAMPLE_EPISTEMIC_SAMPLES)
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    start = time.perf_counter()
    summary = scoring({}, datastore)
    print("SECONDS_PER_IMAGE", (time.perf_counter() - start) / summary["executed"], flush=True)
    shutil.rmtree(root, ignore_errors=True)


def ours_score_child(images: list[str]) -> None:
    """Child: this project's epistemic scoring (``organs_ct``), as the server's scoring task runs it."""
    from radiology.app import RadiologyApp

    root = Path(tempfile.mkdtemp(prefix="peer-score-"))
    app_dir, studies = copy_project_app(root / "app"), root / "studies"
    studies.mkdir()
    for image in images:
        shutil.copyfile(image, studies / Path(image).name)
    conf = {"models": "organs_ct", "score_on_start": "false", "score_after_train": "false"}
    app = RadiologyApp(str(app_dir), str(studies), conf)
    start = time.perf_counter()
    result = app.scoring({"method": "epistemic"})
    print("SECONDS_PER_IMAGE", (time.perf_counter() - start) / result["scored"], flush=True)
    shutil.rmtree(root, ignore_errors=True)


def _run_child(args: list[str], env: Mapping[str, str], python: str = sys.executable) -> tuple[str, float]:
    """Run ``python -m benchmarks.peer <args>``; its stdout and the peak memory of its process tree."""
    cmd = [python, "-m", "benchmarks.peer", *args]
    # No datastore file watcher: the children delete their folders while it would still be watching.
    env = {**os.environ, **env, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRSS(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return out, mem.peak


# -- the whole run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volumes:
    ct: list[Path]
    mr: list[Path]
    train_pairs: list[tuple[Path, Path]]


def prepare_volumes(shared: Path, work: Path, mr_cases: int, big_ct: bool) -> Volumes:
    """The real volumes both apps see, and labelled CT pairs with labels in ``organs_ct`` ids."""
    from radiology.registry import MODELS
    from research.radiology.label_mapping import load_class_map, remap_by_name
    from research.radiology.splits import msd_cases, split_cases

    totalseg, spleen = shared / "totalseg_ct", shared / "spleen_ct"
    ct = [spleen / "imagesTr" / "spleen_2.nii.gz", totalseg / "example_ct_sm.nii.gz"]
    if big_ct:
        ct.append(totalseg / "example_ct.nii.gz")
    mr = [c.image for c in split_cases(msd_cases(shared / "hippocampus_mr"))["test"][:mr_cases]]
    labels = work / "labels"
    labels.mkdir()
    seg = nib.load(totalseg / "example_seg.nii.gz")
    organs = remap_by_name(
        np.rint(np.asarray(seg.dataobj)).astype(np.int64),
        load_class_map(totalseg / "class_map.json"),
        MODELS["organs_ct"].labels,
    )
    nib.save(nib.Nifti1Image(organs.astype(np.uint8), seg.affine), labels / "example_ct_sm.nii.gz")
    spl = nib.load(spleen / "labelsTr" / "spleen_2.nii.gz")
    nib.save(nib.Nifti1Image(np.rint(np.asarray(spl.dataobj)).astype(np.uint8), spl.affine), labels / "spleen_2.nii.gz")
    aorta = nib.load(totalseg / "chest_aorta" / "aorta.nii.gz")
    aorta_id = MODELS["organs_ct"].labels.name_to_id()["aorta"]
    values = (np.asarray(aorta.dataobj) > 0).astype(np.uint8) * aorta_id
    nib.save(nib.Nifti1Image(values, aorta.affine), labels / "chest_aorta.nii.gz")
    # Both apps train on the same volumes; none thinner than the sample's 96 mm patch (see WORKAROUNDS).
    chest = work / "chest_aorta.nii.gz"
    shutil.copyfile(totalseg / "chest_aorta" / "ct_cropped.nii.gz", chest)
    pairs = [(ct[0], labels / "spleen_2.nii.gz"), (chest, labels / "chest_aorta.nii.gz")]
    return Volumes(ct=ct, mr=mr, train_pairs=pairs)


def serve_rows(s: ServerFigures, o: ServerFigures, vols: Volumes) -> list[Row]:
    """Start-up, infer per CT volume and over the MR volumes, and peak memory: sample ``s`` against ours ``o``."""
    n = len(s.startup)
    rows = [Row("start-up to /info answering", "s", median(s.startup), median(o.startup), f"median of {n}")]
    for path in vols.ct:
        geo = f"geometry = input: sample {s.geometry_ok[path.name]}, ours {o.geometry_ok[path.name]}"
        rows.append(
            Row(
                f"infer CT {path.name} ({_shape(path)}): organs_ct vs {SAMPLE_MODEL}",
                "s",
                median(s.infer[path.name]),
                median(o.infer[path.name]),
                f"median of {n}; {geo}",
            )
        )
    mr_s = [t for p in vols.mr for t in s.infer[p.name]]
    mr_o = [t for p in vols.mr for t in o.infer[p.name]]
    geo_s, geo_o = all(s.geometry_ok[p.name] for p in vols.mr), all(o.geometry_ok[p.name] for p in vols.mr)
    rows.append(
        Row(
            f"infer MR, {len(vols.mr)} hippocampus_mr test cases: hippocampus vs {SAMPLE_MODEL}",
            "s",
            median(mr_s),
            median(mr_o),
            f"median of {len(mr_o)}; geometry = input: sample {geo_s}, ours {geo_o}",
        )
    )
    rows.append(
        Row(
            "server peak RSS (start-up + all infers)",
            "MB",
            s.peak_rss / 2**20,
            o.peak_rss / 2**20,
            "process tree, max over runs; ours serves 2 models, the sample 1",
        )
    )
    return rows


def run(
    shared: Path,
    repeats: int,
    mr_cases: int,
    big_ct: bool,
    parts: set[str],
    before: Path | None = None,
    score_volumes: int | None = None,
    sample_python: str = sys.executable,
) -> tuple[list[tuple[str, list[Row]]], list[str]]:
    """Every part asked for; the tables (title, rows) and notes on the machine's load."""
    work = Path(tempfile.mkdtemp(prefix="peer-"))

    def python_of(who: str) -> str:
        return sample_python if who == SAMPLE else sys.executable

    notes: list[str] = []
    rows: list[Row] = []
    tables: list[tuple[str, list[Row]]] = []
    vols = prepare_volumes(shared, work, mr_cases, big_ct)
    studies = work / "studies"
    studies.mkdir()
    for path in vols.ct + vols.mr:
        shutil.copyfile(path, studies / path.name)
    apps = {SAMPLE: copy_sample_app(work / "sample"), OURS: copy_project_app(work / "ours")}

    if "serve" in parts:
        trees: dict[str, Path | None] = {SAMPLE: None, OURS: None}
        if before is not None:
            trees = {SAMPLE: None, BEFORE: before, OURS: None}
        figs = {who: ServerFigures() for who in trees}
        load0 = _load()
        for r in range(repeats):
            for who, tree in trees.items():
                app = apps[SAMPLE if who == SAMPLE else OURS]
                _serve_once(
                    who,
                    app,
                    studies,
                    {"CT": vols.ct, "MR": vols.mr},
                    figs[who],
                    work / f"{who}{r}.log",
                    tree,
                    python_of(who),
                )
        notes.append(f"servers: load {load0:.2f} before, {_load():.2f} after")
        if before is not None:
            tables.append((f"this project before the change ({before})", serve_rows(figs[SAMPLE], figs[BEFORE], vols)))
        rows = serve_rows(figs[SAMPLE], figs[OURS], vols)

    if "train" in parts:
        pair_args = [str(p) for pair in vols.train_pairs for p in pair]
        contenders = {
            SAMPLE: ["--sample-train-child", str(apps[SAMPLE]), *pair_args],
            OURS: ["--ours-train-child", *pair_args],
            "ours96": ["--ours-train-child", *pair_args, "--roi", "96,96,96", "--samples", "1", "--batch", "1"],
        }
        epochs: dict[str, list[float]] = {k: [] for k in contenders}
        peaks: dict[str, float] = dict.fromkeys(contenders, 0.0)
        load0 = _load()
        for _ in range(repeats):
            for who, args in contenders.items():
                out, peak = _run_child([*args, "--epochs", str(TRAIN_EPOCHS)], sample_env(), python_of(who))
                epochs[who] += child_value(out, "EPOCH_SECONDS")
                peaks[who] = max(peaks[who], peak)
        notes.append(f"training: load {load0:.2f} before, {_load():.2f} after")
        what = f"{len(vols.train_pairs)} labelled CT, {TRAIN_EPOCHS} epochs incl. set-up, median of {repeats} runs"
        rows.append(
            Row(
                "training s/epoch, each app's own patch (sample 96^3 @1 mm batch 1; ours 64x64x48 @2x2x3 mm, "
                "4 patches/image, batch 4)",
                "s/epoch",
                median(epochs[SAMPLE]),
                median(epochs[OURS]),
                what,
            )
        )
        rows.append(
            Row(
                "training s/epoch at equal patch: ours at 96^3, 1 patch/image, batch 1",
                "s/epoch",
                median(epochs[SAMPLE]),
                median(epochs["ours96"]),
                what,
            )
        )
        rows.append(
            Row("training peak RSS, process tree (own patch)", "MB", peaks[SAMPLE] / 2**20, peaks[OURS] / 2**20, "max")
        )
        rows.append(
            Row(
                "training peak RSS, process tree (equal patch)",
                "MB",
                peaks[SAMPLE] / 2**20,
                peaks["ours96"] / 2**20,
                "",
            )
        )

    if "score" in parts:
        images = [str(p) for p in vols.ct[:score_volumes]]
        contenders = {
            SAMPLE: ["--sample-score-child", str(apps[SAMPLE]), *images],
            OURS: ["--ours-score-child", *images],
        }
        secs: dict[str, list[float]] = {k: [] for k in contenders}
        load0 = _load()
        for _ in range(repeats):
            for who, args in contenders.items():
                out, _ = _run_child(args, sample_env(), python_of(who))
                secs[who] += child_value(out, "SECONDS_PER_IMAGE")
        notes.append(f"scoring: load {load0:.2f} before, {_load():.2f} after")
        rows.append(
            Row(
                f"epistemic scoring, {len(images)} CT volumes (sample: epistemic_v2, {SAMPLE_EPISTEMIC_SAMPLES} "
                "passes; ours: MC dropout, 8 passes batched)",
                "s/image",
                median(secs[SAMPLE]),
                median(secs[OURS]),
                f"median of {repeats} runs",
            )
        )
    shutil.rmtree(work, ignore_errors=True)
    return [*tables, ("this project", rows)], notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mr-cases", type=int, default=5)
    parser.add_argument("--big-ct", action="store_true", help="also infer totalseg_ct/example_ct (122x101x112 @3mm)")
    parser.add_argument("--parts", default="serve,train,score", help="comma-separated: serve, train, score")
    parser.add_argument("--score-volumes", type=int, help="score only the first N CT volumes (spleen_2 first)")
    parser.add_argument(
        "--before",
        type=Path,
        help="also serve this project's code from this folder (e.g. `git archive` of an earlier commit), in turns",
    )
    parser.add_argument(
        "--sample-python",
        default=sys.executable,
        help="interpreter of the environment the sample app runs in (it needs torchvision, hence the CUDA torch: "
        "`make venv VENV=DIR TORCH=cuda`); default: this one",
    )
    # Child processes (internal).
    parser.add_argument("--sample-train-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--ours-train-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sample-score-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--ours-score-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help=argparse.SUPPRESS)
    parser.add_argument("--roi", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sample_train_child:
        sample_train_child(Path(args.sample_train_child[0]), args.sample_train_child[1:], args.epochs)
        return
    if args.ours_train_child:
        roi = tuple(int(x) for x in args.roi.split(",")) if args.roi else None
        ours_train_child(args.ours_train_child, args.epochs, roi, args.samples, args.batch)
        return
    if args.sample_score_child:
        sample_score_child(Path(args.sample_score_child[0]), args.sample_score_child[1:])
        return
    if args.ours_score_child:
        ours_score_child(args.ours_score_child)
        return

    check_pins()
    check_sample_python(args.sample_python)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"serve", "train", "score"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; valid: serve, train, score")
    load = _load()
    tables, notes = run(
        args.shared,
        args.repeats,
        args.mr_cases,
        args.big_ct,
        parts,
        before=args.before,
        score_volumes=args.score_volumes,
        sample_python=args.sample_python,
    )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU only)"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; load average before: {load:.2f}")
    print(f"sample app: {args.sample_python} ({torch_versions(args.sample_python)})")
    print(f"this project: {sys.executable} ({torch_versions(sys.executable)})")
    print("; ".join(notes))
    for title, rows in tables:
        print(f"\n{title}:\n{format_table(rows)}")
    print("sample app workarounds:")
    for w in WORKAROUNDS:
        print(f"- {w.how()}: {w.finding}")


if __name__ == "__main__":
    main()
