"""The pathology models this app can serve; adding a model is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

from pathology.spec import NUCLEI, NucleiSpec


@dataclass(frozen=True)
class PathologyModel:
    """A served model: the network it runs and whether it answers clicks (``nuclick``) or the whole region."""

    name: str
    spec: NucleiSpec
    nuclick: bool = False


# Both models run the same network (and so train the same weights): nuclick picks from its output.
MODELS: dict[str, PathologyModel] = {
    "nuclei": PathologyModel("nuclei", NUCLEI),
    "nuclick": PathologyModel("nuclick", NUCLEI, nuclick=True),
}
