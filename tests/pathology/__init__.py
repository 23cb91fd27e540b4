"""Tests of the pathology package."""
