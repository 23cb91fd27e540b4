"""Writing one version of a served model as a MONAI Bundle in the model-zoo layout.

The apps give the parts that differ (``radiology.export``, ``pathology.export``): the
``inference.json`` config and the model-specific metadata. This module writes them with the
weights (``models/model.pt``, a plain state dict as in the model zoo; ``models/model.ts``, the
network compiled with TorchScript) and the version history, which it reads from the version store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from appcore.versions import SHIPPED, VersionStore
from appcore.weights import load_state_dict

# The model zoo's metadata schema the written ``metadata.json`` follows (its required keys).
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
)

# What the model zoo's bundles carry as ``configs/logging.conf``: MONAI's runner reads it.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

# Where a site's own labels come from; their licence is the site's to state.
SERVER_LABELS = "labels saved on this server by its annotators (licence: the site's own terms for its images)"


def inference_skeleton(
    *,
    imports: list[str],
    pattern: str,
    network_def: dict[str, Any],
    preprocessing: list[dict[str, Any]],
    inferer: dict[str, Any],
    postprocessing: list[dict[str, Any]],
) -> dict[str, Any]:
    """An ``inference.json`` with the ids of the model zoo and of MONAI Label's ``monaibundle`` app
    (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), segmenting each file of
    ``dataset_dir`` matching ``pattern`` one at a time with MONAI's ``SupervisedEvaluator``; the
    apps give the parts that differ."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", *imports],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": f"$sorted(glob.glob(os.path.join(@dataset_dir, {pattern!r})))",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def lineage(store: VersionStore, number: int) -> list[dict[str, Any]]:
    """Version ``number``'s record and those it started from (``parent``), newest first, each with the
    images it was trained and validated on."""
    records = {r["version"]: r for r in store.versions()}
    chain, seen = [], set()
    current: int | None = number
    while current is not None and current in records and current not in seen:
        seen.add(current)
        record = {k: v for k, v in records[current].items() if k not in ("served", "weights")}
        chain.append(record)
        current = record.get("parent")
    return chain


def data_licences(chain: list[dict[str, Any]], shipped_data: str | None) -> list[str]:
    """What the weights of a version were trained on, through its lineage, with the licences known."""
    out = []
    if any(r["version"] == SHIPPED for r in chain) and shipped_data:
        out.append(f"shipped weights: {shipped_data}")
    if any(r.get("source") == "training" for r in chain):
        out.append(f"fine-tuning: {SERVER_LABELS}")
    if any(r.get("source") in ("upload", "found") for r in chain):
        out.append("uploaded or found weights: unknown training data and licence (ask who uploaded them)")
    return out or ["unknown"]


def write_bundle(
    out: Path,
    *,
    store: VersionStore,
    number: int,
    network: torch.nn.Module,
    inference: dict[str, Any],
    metadata: dict[str, Any],
    readme: str,
) -> Path:
    """Write version ``number`` of ``store``'s model as a bundle in ``out`` (created; must be empty).

    ``network`` is an untrained instance of the served network; ``metadata`` holds the model's own
    keys, to which the version's history, versions of the libraries and the schema are added.
    """
    store.record(number)  # 404 for an unknown version or one whose weights were removed
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new or empty folder to export into")
    with store.reading(number) as weights:  # not removed meanwhile by a publish's pruning
        state = load_state_dict(weights)
    network.load_state_dict(state, strict=True)
    network = network.float().eval()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    # As stored (the shipped hippocampus weights are float16: half the size); loading casts to the
    # network's float32, as the server's loading does.
    torch.save(state, out / "models" / "model.pt")
    torch.jit.script(network).save(str(out / "models" / "model.ts"))
    chain = lineage(store, number)
    full = {
        "schema": METADATA_SCHEMA,
        "version": f"{number}.0.0",
        "changelog": {f"{r['version']}.0.0": _describe(r) for r in chain},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        **metadata,
        "served_version": number,
        "version_history": chain,
        "data_licence": data_licences(chain, metadata.get("training_data")),
        "exported_from": {"model": store.model, "version": number, "host": platform.node()},
    }
    _write_json(out / "configs" / "metadata.json", full)
    _write_json(out / "configs" / "inference.json", inference)
    (out / "docs" / "README.md").write_text(readme)
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    return out


def _describe(record: dict[str, Any]) -> str:
    source = record.get("source")
    if source == "shipped":
        return "the weights shipped with the server"
    if source == "training":
        figures = ", ".join(
            f"{k} {record[k]:.4f}" for k in ("start_val_dice", "best_val_dice") if record.get(k) is not None
        )
        return (
            f"fine-tuned on the server from version {record.get('parent')} by {record.get('started_by')} at "
            f"{record.get('published_at')}: {len(record.get('trained_images', []))} training and "
            f"{len(record.get('validated_images', []))} validation labels" + (f"; {figures}" if figures else "")
        )
    return f"{source} by {record.get('started_by')} at {record.get('published_at')}"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    os.chmod(path, 0o644)


def export_command(
    argv: list[str] | None,
    *,
    description: str,
    models: Collection[str],
    app_dir: Path,
    open_store: Callable[[str, Path], VersionStore],
    export: Callable[[str, VersionStore, int, Path], object],
) -> int:
    """``python -m radiology.export`` and ``pathology.export``: write one version of a model
    (``--version``, else the served one) as a bundle in ``--out``; a usage error names an unknown
    model or version, or an ``--out`` that is not new or empty.

    Args:
        argv: the arguments (``sys.argv[1:]`` for None).
        description: the command's help text.
        models: the model names the app registers.
        app_dir: the app's folder by default (``--app-dir``).
        open_store: the version store of a model, given its name and the app's folder.
        export: writes a model's version from its store into a folder.
    """
    from appcore.errors import RequestError

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(models))
    parser.add_argument("--version", type=int, default=None, help="version number (default: the served one)")
    parser.add_argument("--app-dir", type=Path, default=app_dir, help="the app's folder")
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder for the bundle")
    args = parser.parse_args(argv)
    store = open_store(args.model, args.app_dir)
    try:
        version = store.served_record()["version"] if args.version is None else args.version
        export(args.model, store, version, args.out)
    except RequestError as e:
        parser.error(str(e.detail))
    except FileExistsError as e:
        parser.error(str(e))
    print(f"{args.out}: {args.model} version {version} as a MONAI Bundle")
    return 0
