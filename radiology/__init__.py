"""Radiology models (3D segmentation of CT and MR) served through MONAI Label."""
