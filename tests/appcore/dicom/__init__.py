"""Tests of the appcore.dicom package."""
