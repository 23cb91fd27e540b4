"""One source of truth for a model's labels: name, integer id, display colour and SNOMED CT code."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Label:
    """One segment class.

    Args:
        name: machine name, as the clients show and send it (``"spleen"``).
        id: integer value of the class in label volumes; 0 is reserved for background.
        color: display colour as ``(r, g, b)``, each 0-255.
        snomed: SNOMED CT code of the anatomical structure, where one exists.
        snomed_meaning: the code's preferred term.
    """

    name: str
    id: int
    color: tuple[int, int, int]
    snomed: str | None = None
    snomed_meaning: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"Label name must be a non-empty identifier, got {self.name!r}")
        if not 1 <= self.id <= 255:
            raise ValueError(f"Label {self.name!r}: id must be in 1..255 (0 is background), got {self.id}")
        if len(self.color) != 3 or any(not 0 <= c <= 255 for c in self.color):
            raise ValueError(f"Label {self.name!r}: color must be three values in 0..255, got {self.color}")

    @property
    def hex_color(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)


@dataclass(frozen=True)
class LabelSet:
    """An ordered, validated collection of labels (background excluded)."""

    labels: tuple[Label, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [label.name for label in self.labels]
        ids = [label.id for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate label names in {names}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Duplicate label ids in {ids}")

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Network output channels: background plus the highest label id."""
        return max(self.ids) + 1

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(label.id for label in self.labels)

    @property
    def allowed_values(self) -> frozenset[int]:
        """Values a saved label volume may contain (background included)."""
        return frozenset((0, *self.ids))

    def name_to_id(self) -> dict[str, int]:
        """The ``{name: id}`` mapping MONAI Label clients expect in ``/info``."""
        return {label.name: label.id for label in self.labels}

    def by_name(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(f"Unknown label {name!r}; valid names: {[label.name for label in self.labels]}")
