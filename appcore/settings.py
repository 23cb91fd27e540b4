"""The app's ``--conf`` options, parsed once into a frozen, typed object with every default here."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

from appcore.cross_site import normal_host, normal_origin
from appcore.history import TrainOn

MAX_TTA_SAMPLES = 6  # the test-time augmentations radiology.uncertainty defines

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"--conf {key}: expected true or false, got {value!r}")


def _parse_int(key: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--conf {key}: expected an integer, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"--conf {key}: must be at least {minimum}, got {n}")
    return n


def _parse_list(key: str, value: str, normal: Callable[[str], str]) -> tuple[str, ...]:
    """A comma-separated list, each item put in ``normal`` form (which raises on a malformed one)."""
    try:
        return tuple(dict.fromkeys(normal(item) for item in value.split(",") if item.strip()))
    except ValueError as e:
        raise ValueError(f"--conf {key}: {e}") from None


def _parse_float(key: str, value: str, minimum: float) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"--conf {key}: expected a number, got {value!r}") from None
    if x < minimum:
        raise ValueError(f"--conf {key}: must be at least {minimum}, got {x}")
    return x


_BOOL_KEYS = ("score_after_train", "score_on_start", "score_new_images", "cpu_bf16", "expose_logs", "allow_anonymous")


@dataclass(frozen=True)
class AppSettings:
    """Options a user passes as ``--conf KEY VALUE`` to ``monailabel start_server``.

    Args:
        models: models to serve, in order; the first one drives active learning unless ``al_model``.
        al_model: the model whose uncertainty ranks images for ``epistemic``.
        mc_samples: Monte Carlo dropout passes per image when scoring uncertainty.
        tta_samples: test-time augmentations per image when scoring (``tta`` and the embedding used
            by ``diversity``; 0 turns both off).
        reservation_s: seconds an image handed out by a strategy stays reserved for that client.
        max_k: the most images (pathology: patches) one next-sample request may ask for (``k``), as
            each is then reserved for that client.
        max_epochs: default epochs of one ``/train`` run.
        train_batch_size: default patches per training step.
        val_split: share of labelled images held out for validation when at least 5 are labelled.
        max_upload_mb: largest label or image upload accepted (file size, and NIfTI voxel data once decompressed).
        score_after_train: rescore the unlabelled images as soon as a training run finishes.
        score_on_start: rescore stale images when the server starts. In the pathology app: measure the
            patches of every image in the background, at start and again for new images and weights.
        score_new_images: start a scoring run when a next-sample request of a strategy that ranks by
            score finds unlabelled images that have no score yet (added since the last run: uploaded,
            copied into the folder, new series in the PACS) and no training or scoring is running.
        sw_batch_size: sliding windows evaluated per forward pass at inference.
        infer_concurrency: the most infers (and WSI infers) computed at once; more requests wait for
            a slot. Each holds a volume's network activations, so this bounds the server's memory.
        infer_memory_mb: the most memory (MB) one radiology infer may take, estimated from the image's
            header before any voxel is read (``appcore.validation.infer_memory_mb``); a larger image
            is refused with a 413, at infer and at upload. ``infer_concurrency`` infers at once take
            at most that many times as much: the defaults (2 x 640 MB) keep a server with the shipped
            models under 2 GB whatever it is sent (``benchmarks/RESULTS.md``, "Attacks").
        cpu_bf16: run the radiology networks (infer, scoring and ``/train``) in bfloat16 on CPUs that
            compute it natively (AMX or AVX512-BF16; ``appcore.precision``); ``false`` keeps float32
            everywhere. No effect on older CPUs or on CUDA, which always uses mixed precision.
        expose_logs: serve this server's log at ``GET /logs/`` (a 403 otherwise: there is no
            authentication yet, and the log names images, clients and server folders).
        cors_origins: origins of other viewers' web pages allowed to use the API (CORS, and requests
            that change something); none by default: only the server's own pages (``/ohif/``).
        allowed_hosts: host names the server may be reached by besides ``localhost`` and IP
            addresses (against DNS rebinding; ``appcore.cross_site``).
        body_timeout_s: seconds a request body may pause between two chunks before the request is
            answered with a 408.
        keep_versions: how many of a model's newest weight versions keep their file
            (``appcore.versions``); the served version and the shipped weights are always kept.
        train_on: which ``final`` labels training uses: ``submitted`` (every label whose current version
            is not rejected) or ``approved`` (only those a reviewer approved; ``docs/history.md``).
        allow_anonymous: let the server listen on a non-loopback address with authentication off
            (``MONAI_LABEL_AUTH_ENABLE``); without it such a start is refused (``appcore.auth``).
        max_clicks: the most clicks (every label's and background's together) one request to an
            interactive model may carry; more are a 422 (``radiology.interactive``).
        train_after_labels: start a training of the model once this many labels were saved from the
            OHIF labeling panel since the last one it started (0: only when asked).
    """

    models: tuple[str, ...]
    al_model: str
    mc_samples: int = 8
    tta_samples: int = 4
    reservation_s: float = 600.0
    max_k: int = 50
    max_epochs: int = 20
    train_batch_size: int = 4
    val_split: float = 0.2
    max_upload_mb: int = 1024
    score_after_train: bool = True
    score_on_start: bool = True
    score_new_images: bool = True
    sw_batch_size: int = 1
    infer_concurrency: int = 2
    infer_memory_mb: int = 640
    cpu_bf16: bool = True
    expose_logs: bool = False
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    body_timeout_s: float = 60.0
    keep_versions: int = 5
    train_on: TrainOn = TrainOn.submitted
    allow_anonymous: bool = False
    max_clicks: int = 200
    train_after_labels: int = 0

    @classmethod
    def from_conf(cls, conf: Mapping[str, str], available: Iterable[str]) -> AppSettings:
        """Validate ``conf`` (the ``--conf`` pairs) against the registered model names.

        Raises:
            ValueError: an unknown model, an unknown option or a malformed value; the message lists
                the valid choices.
        """
        available = list(available)
        raw = conf.get("models", "all").strip()
        if raw in ("", "all"):
            models = tuple(available)
        else:
            models = tuple(dict.fromkeys(m.strip() for m in raw.split(",") if m.strip()))
            unknown = [m for m in models if m not in available]
            if unknown:
                raise ValueError(f"--conf models: unknown model(s) {unknown}; valid choices: {sorted(available)}")
        if not models:
            raise ValueError(f"--conf models: no model selected; valid choices: {sorted(available)}")

        al_model = conf.get("al_model", models[0]).strip()
        if al_model not in models:
            raise ValueError(f"--conf al_model: {al_model!r} is not among the served models {list(models)}")

        kwargs: dict[str, object] = {"models": models, "al_model": al_model}
        known = {f.name for f in fields(cls)}
        # Keys MONAI Label or its clients pass through --conf that are not ours to validate.
        passthrough = {"preload", "server_mode", "use_pretrained_model", "skip_scoring", "skip_strategies"}
        unknown_keys = sorted(set(conf) - known - passthrough)
        if unknown_keys:
            raise ValueError(f"Unknown --conf option(s) {unknown_keys}; valid options: {sorted(known)}")
        for key, value in conf.items():
            if key in ("models", "al_model") or key in passthrough:
                continue
            if key in (
                "mc_samples",
                "max_epochs",
                "train_batch_size",
                "sw_batch_size",
                "max_upload_mb",
                "infer_concurrency",
                "infer_memory_mb",
                "max_k",
                "keep_versions",
                "max_clicks",
            ):
                kwargs[key] = _parse_int(key, value, 1)
            elif key == "train_after_labels":
                kwargs[key] = _parse_int(key, value, 0)
            elif key == "tta_samples":
                kwargs[key] = _parse_int(key, value, 0)
                if kwargs[key] > MAX_TTA_SAMPLES:
                    raise ValueError(f"--conf tta_samples: at most {MAX_TTA_SAMPLES}, got {kwargs[key]}")
            elif key == "reservation_s":
                kwargs[key] = _parse_float(key, value, 0.0)
            elif key == "val_split":
                split = _parse_float(key, value, 0.0)
                if split >= 0.9:
                    raise ValueError(f"--conf val_split: must be below 0.9, got {split}")
                kwargs[key] = split
            elif key in _BOOL_KEYS:
                kwargs[key] = _parse_bool(key, value)
            elif key == "cors_origins":
                kwargs[key] = _parse_list(key, value, normal_origin)
            elif key == "allowed_hosts":
                kwargs[key] = _parse_list(key, value, normal_host)
            elif key == "train_on":
                choices = [t.value for t in TrainOn]
                if value.strip().lower() not in choices:
                    raise ValueError(f"--conf train_on: expected one of {choices}, got {value!r}")
                kwargs[key] = TrainOn(value.strip().lower())
            elif key == "body_timeout_s":
                kwargs[key] = _parse_float(key, value, 0.1)
                if not math.isfinite(kwargs[key]):
                    raise ValueError(f"--conf body_timeout_s: expected a number of seconds, got {value!r}")
        return cls(**kwargs)  # type: ignore[arg-type]
