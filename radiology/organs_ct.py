"""Abdominal organs in CT; starts untrained and learns from the labels clinicians save."""

from __future__ import annotations

from appcore.labels import Label, LabelSet
from radiology.spec import CTWindow, ModelSpec

ORGANS_CT = ModelSpec(
    name="organs_ct",
    description="3D segmentation of abdominal organs in CT (untrained until labels are saved)",
    labels=LabelSet(
        (
            Label("spleen", 1, (157, 108, 162), "78961009", "Spleen"),
            Label("kidney_right", 2, (185, 102, 83), "9846003", "Right kidney"),
            Label("kidney_left", 3, (120, 190, 90), "18639004", "Left kidney"),
            Label("gallbladder", 4, (139, 150, 98), "28231008", "Gallbladder"),
            Label("liver", 5, (221, 130, 101), "10200004", "Liver"),
            Label("stomach", 6, (216, 132, 105), "69695003", "Stomach"),
            Label("pancreas", 7, (249, 180, 111), "15776009", "Pancreas"),
            Label("aorta", 8, (224, 97, 76), "15825003", "Aorta"),
        )
    ),
    modality="CT",
    # 2 x 2 x 3 mm keeps a whole abdomen within a few sliding windows on a 2-core CPU.
    spacing=(2.0, 2.0, 3.0),
    roi_size=(64, 64, 48),
    # Soft-tissue abdominal window.
    intensity=CTWindow(low=-175.0, high=250.0),
    channels=(16, 32, 64, 128),
    strides=(2, 2, 2),
    dropout=0.1,
    shipped_weights=None,
    learning_rate=3e-3,
    samples_per_image=4,
)
