"""Active-learning strategies and uncertainty scoring shared by the radiology and pathology apps."""
