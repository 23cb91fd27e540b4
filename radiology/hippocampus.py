"""Hippocampus in brain MR (MSD Task04): anterior and posterior parts."""

from __future__ import annotations

from appcore.labels import Label, LabelSet
from radiology.spec import ModelSpec, ZScore

HIPPOCAMPUS = ModelSpec(
    name="hippocampus",
    description="3D segmentation of the anterior and posterior hippocampus in T1 brain MR crops",
    labels=LabelSet(
        (
            # No SNOMED CT code is given: the halves have none of their own and we could not verify
            # the whole structure's code offline. Segments are still named and coloured.
            Label("anterior", 1, (255, 153, 0)),
            Label("posterior", 2, (0, 170, 255)),
        )
    ),
    modality="MR",
    spacing=(1.0, 1.0, 1.0),
    roi_size=(48, 64, 48),
    intensity=ZScore(nonzero=False),
    channels=(24, 48, 96, 192),
    strides=(2, 2, 2),
    dropout=0.1,
    shipped_weights="hippocampus.pt",
    # Four networks trained apart, their probabilities averaged: +0.0035 on validation over one
    # (benchmarks/RESULTS.md, "the four train + validation networks averaged"; model card).
    members=4,
    learning_rate=5e-4,
    samples_per_image=1,
    training_data="Medical Segmentation Decathlon Task04 Hippocampus, 160 cases (CC-BY-SA 4.0)",
)
