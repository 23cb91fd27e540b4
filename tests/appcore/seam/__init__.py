"""Tests of the appcore.seam package."""
