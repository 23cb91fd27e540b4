"""The radiology models this app can serve; adding a model is one module and one line here."""

from __future__ import annotations

from radiology.hippocampus import HIPPOCAMPUS
from radiology.organs_ct import ORGANS_CT
from radiology.spec import ModelSpec

MODELS: dict[str, ModelSpec] = {
    "hippocampus": HIPPOCAMPUS,
    "organs_ct": ORGANS_CT,
}
