"""Tests of the appcore package."""
