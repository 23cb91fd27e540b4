"""Pathology research: offline training of the nuclei network, its metrics, and the DSB2018 split."""
