"""Pathology research: offline training of the nuclei network and its metrics."""
