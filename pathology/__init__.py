"""The pathology MONAI Label app: nuclei instance segmentation on H&E tiles and whole-slide images."""
