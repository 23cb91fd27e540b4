"""The apps' ``--conf`` options, parsed once into a frozen, typed object with every default here.

``Settings`` holds the options both apps read; ``RadiologySettings`` and ``PathologySettings`` add
each app's own. One parser reads every option from its dataclass field: the field's type says how
(``bool``, ``int``, ``float``, ``str``, ``tuple[str, ...]``), its metadata the bounds and the
one-line doc that ``docs/options.md`` is generated from (``python -m appcore.settings``). An option
the app does not have is refused with the list of the ones it has.
"""

from __future__ import annotations

import enum
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from appcore.cross_site import normal_host, normal_origin
from appcore.history import TrainOn
from appcore.projectdb import normal_database_url

MAX_TTA_SAMPLES = 6  # the test-time augmentations radiology.uncertainty defines

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Keys MONAI Label or its clients pass through --conf that are not ours to validate.
PASSTHROUGH = frozenset({"preload", "server_mode", "use_pretrained_model", "skip_scoring", "skip_strategies"})

S = TypeVar("S", bound="Settings")


def option(
    default: Any = MISSING,
    *,
    doc: str,
    least: float | None = None,
    most: float | None = None,
    below: float | None = None,
    normal: Callable[[str], str] | None = None,
    shown: str | None = None,
) -> Any:
    """A settings field: its ``default``, the one-line ``doc`` of ``docs/options.md``, and what the
    parser checks: a number's bounds (``least`` <= value <= ``most``, value < ``below``), the
    ``normal`` form of each item of a list (a function that raises ``ValueError`` on a bad one).
    ``shown``: the default as the docs write it, where the field has none of its own."""
    metadata = {"doc": doc, "least": least, "most": most, "below": below, "normal": normal, "shown": shown}
    return field(default=default, metadata=metadata)


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"--conf {key}: expected true or false, got {value!r}")


def _parse_number(key: str, value: str, kind: type, f: Field) -> int | float:
    try:
        n = kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"--conf {key}: expected {what}, got {value!r}") from None
    if kind is float and not math.isfinite(n):
        unit = " of seconds" if key.endswith("_s") else ""
        raise ValueError(f"--conf {key}: expected a number{unit}, got {value!r}, which is not finite")
    least, most, below = f.metadata["least"], f.metadata["most"], f.metadata["below"]
    if least is not None and n < least:
        raise ValueError(f"--conf {key}: must be at least {least}, got {n}")
    if most is not None and n > most:
        raise ValueError(f"--conf {key}: at most {most}, got {n}")
    if below is not None and n >= below:
        raise ValueError(f"--conf {key}: must be below {below}, got {n}")
    return n


def _parse_list(key: str, value: str, f: Field) -> tuple[str, ...]:
    """A comma-separated list, each item put in its ``normal`` form (which raises on a malformed one)."""
    normal = f.metadata["normal"] or str.strip
    try:
        return tuple(dict.fromkeys(normal(item) for item in value.split(",") if item.strip()))
    except ValueError as e:
        raise ValueError(f"--conf {key}: {e}") from None


def parse_option(cls: type[Settings], key: str, value: str) -> object:
    """``value`` (a ``--conf`` string) as the type of ``cls``'s field ``key``, checked against its bounds.

    Raises:
        ValueError: a malformed or out-of-bounds value; the message names the option and what it expects.
    """
    f = {f.name: f for f in fields(cls)}[key]
    kind = typing.get_type_hints(cls)[key]
    if kind is bool:
        return _parse_bool(key, value)
    if kind in (int, float):
        return _parse_number(key, value, kind, f)
    if typing.get_origin(kind) is tuple:
        return _parse_list(key, value, f)
    if kind is str:
        normal = f.metadata["normal"]
        try:
            return normal(value.strip()) if normal else value.strip()
        except ValueError as e:
            raise ValueError(f"--conf {key}: {e}") from None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [str(member.value) for member in kind]
        v = value.strip().lower()
        if v not in choices:
            raise ValueError(f"--conf {key}: expected one of {choices}, got {value!r}")
        return kind(v)
    raise TypeError(f"Settings field {cls.__name__}.{key} has type {kind!r}, which the --conf parser does not read")


@dataclass(frozen=True)
class Settings:
    """Options a user passes as ``--conf KEY VALUE`` to ``monailabel start_server``, both apps alike.

    An app's settings class adds its own fields; every field is an ``option`` (``docs/options.md``).
    """

    app: ClassVar[str] = "both"  # which app's options a class adds, as docs/options.md names it

    models: tuple[str, ...] = option(
        shown="`all`", doc="comma-separated models to serve, in order (`all`: every registered model)"
    )
    al_model: str = option(
        shown="first of `models`",
        doc="model whose uncertainty ranks the images (pathology: the patches) the strategies hand out",
    )
    reservation_s: float = option(600.0, least=0.0, doc="seconds an image handed out stays reserved for its client")
    max_k: int = option(
        50, least=1, doc="most images (pathology: patches) one next-sample request may ask for; more is a 400"
    )
    max_epochs: int = option(20, least=1, doc="epochs per training run (a request's `max_epochs` wins)")
    train_batch_size: int = option(4, least=1, doc="patches per training step")
    max_upload_mb: int = option(
        1024, least=1, doc="largest accepted upload, and largest NIfTI voxel data once decompressed"
    )
    score_on_start: bool = option(
        True,
        doc="rescore stale images at start-up; pathology: measure slide patches in the background (at "
        "start-up, for new images, after new weights)",
    )
    infer_concurrency: int = option(
        2,
        least=1,
        doc="infers (radiology and WSI) computed at once; more requests wait for a slot (each holds a "
        "volume's activations, so this bounds memory)",
    )
    expose_logs: bool = option(
        False,
        doc="serve this server's log at `GET /logs/` (written to `apps/<app>/logs/server-<port>.log`); a 403 "
        "otherwise (with authentication on, admins only: the log names images, users and folders)",
    )
    cors_origins: tuple[str, ...] = option(
        (),
        normal=normal_origin,
        doc="comma-separated origins of other viewers' pages allowed to use the API (CORS without credentials, "
        "and requests that change something); the server's own pages need none",
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        normal=normal_host,
        doc="comma-separated host names the server may be reached by besides `localhost` and IP addresses "
        "(against DNS rebinding); once set, checked on every address",
    )
    body_timeout_s: float = option(
        60.0, least=0.1, doc="seconds a request body may pause between two chunks before the request gets a 408"
    )
    keep_versions: int = option(
        5,
        least=1,
        doc="newest weight versions per model whose file is kept (the served one and the shipped weights always are)",
    )
    mc_samples: int = option(8, least=1, doc="dropout passes per image (pathology: per tile) when scoring")
    score_after_train: bool = option(
        True, doc="rescore the unlabelled images (pathology: tiles) after each completed training run"
    )
    score_new_images: bool = option(
        True,
        doc="when a next-sample request (any strategy but `random`) finds unlabelled images without a score, "
        "start a scoring run in the background unless one or a training runs; until then they are ranked "
        "after the scored images",
    )
    train_on: TrainOn = option(
        TrainOn.submitted,
        shown="submitted",
        doc="which `final` labels training uses: `submitted` (all but rejected ones) or `approved` (reviewed; "
        "label history, review and audit log: [history.md](history.md))",
    )
    allow_anonymous: bool = option(
        False,
        doc="start with authentication off on a non-loopback `--host` (refused otherwise; [auth.md](auth.md))",
    )
    database_url: str = option(
        "",
        normal=normal_database_url,
        shown="`model/project.db`",
        doc="project database (label versions, reviews, reservations, scores, audit log): a "
        "`postgresql://user@host:port/db` URL that several servers share (the password in `PGPASSWORD` or "
        "`~/.pgpass`, never in the URL), or empty for the SQLite file in the model folder "
        "([history.md](history.md#the-project-database))",
    )

    @classmethod
    def options(cls) -> list[str]:
        """The ``--conf`` keys this app takes."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_conf(cls: type[S], conf: Mapping[str, str], available: Iterable[str]) -> S:
        """Validate ``conf`` (the ``--conf`` pairs) against this app's options and registered model names.

        Raises:
            ValueError: an unknown model, an option this app does not have or a malformed value; the
                message lists the valid choices.
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

        known = cls.options()
        unknown_keys = sorted(set(conf) - set(known) - PASSTHROUGH)
        if unknown_keys:
            others = [
                f"{k} is an option of the {s.app} app" for k in unknown_keys for s in APP_SETTINGS if k in s.options()
            ]
            elsewhere = f" ({'; '.join(others)})" if others else ""
            raise ValueError(
                f"Unknown --conf option(s) {unknown_keys} for the {cls.app} app{elsewhere}; "
                f"valid options: {sorted(known)}"
            )
        kwargs: dict[str, object] = {"models": models, "al_model": al_model}
        for key, value in conf.items():
            if key not in kwargs and key not in PASSTHROUGH:
                kwargs[key] = parse_option(cls, key, value)
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RadiologySettings(Settings):
    """The radiology app's options: the common ones and those of its scoring, training and infers."""

    app: ClassVar[str] = "radiology"

    tta_samples: int = option(
        4,
        least=0,
        most=MAX_TTA_SAMPLES,
        doc=f"test-time augmentations per image when scoring (`tta`, and the embedding `diversity` uses; 0 turns "
        f"both off, at most {MAX_TTA_SAMPLES})",
    )
    val_split: float = option(
        0.2, least=0.0, below=0.9, doc="share of labelled images used for validation (from 5 labelled images on)"
    )
    sw_batch_size: int = option(
        1,
        least=1,
        doc="sliding windows per forward pass at inference (1 keeps the peak memory low; on a GPU more may be faster)",
    )
    infer_memory_mb: int = option(
        640,
        least=1,
        doc="most memory (MB) one infer may take, estimated from the image's header before any voxel is read; "
        "a larger image is a 413 at infer, and at upload when no served model fits (see below)",
    )
    cpu_bf16: bool = option(
        True,
        doc="run the networks (infer, scoring and `/train`) in bfloat16 on CPUs with native bfloat16 units "
        "(Intel AMX or AVX512-BF16); no effect elsewhere; `false` keeps float32 (see below)",
    )
    max_clicks: int = option(
        200,
        least=1,
        doc="most clicks one request to an interactive model (`<model>_interactive`, "
        "[interactive.md](interactive.md)) may carry; more is a 422",
    )
    train_after_labels: int = option(
        0,
        least=0,
        doc="start a training once this many labels were saved from the OHIF labeling panel since the last one it "
        "started (0: only when asked; [ohif.md](ohif.md))",
    )
    proposals_ahead: bool = option(
        True,
        doc="at each hand-out to the OHIF panel, compute the proposal of the case its strategy would hand the "
        "same annotator next, after the current one's ([ohif.md](ohif.md)); `false` computes each when handed out",
    )


@dataclass(frozen=True)
class PathologySettings(Settings):
    """The pathology app's options: the common ones (it has none of its own yet)."""

    app: ClassVar[str] = "pathology"


# Every app's settings class, for the messages that name the app an option belongs to.
APP_SETTINGS: tuple[type[Settings], ...] = (RadiologySettings, PathologySettings)

# The radiology app's settings under the name they had before the split (tests and benchmarks use it).
AppSettings = RadiologySettings


def options_table() -> str:
    """The markdown table of every ``--conf`` option, with the apps that take it (``docs/options.md``)."""
    rows = ["| key | app | default | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls in (Settings, *APP_SETTINGS):
        own = [f for f in fields(cls) if f.name not in seen]
        for f in own:
            seen.add(f.name)
            if f.metadata["shown"] is not None:
                default = f.metadata["shown"]
            elif isinstance(f.default, tuple):
                default = ", ".join(f.default) or "none"
            elif isinstance(f.default, bool):
                default = str(f.default).lower()
            else:
                default = f"{f.default:g}"
            rows.append(f"| `{f.name}` | {cls.app} | {default} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_table(), end="")
