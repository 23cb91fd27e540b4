"""Write ``docs/seam.md`` from the table: ``python -m appcore.seam > docs/seam.md``."""

from __future__ import annotations

import sys

from appcore.seam import MONAILABEL_VERSION, markdown

if __name__ == "__main__":
    sys.stdout.write(markdown())
    sys.stderr.write(f"(the rows of appcore/seam/table.py, written for monailabel {MONAILABEL_VERSION})\n")
