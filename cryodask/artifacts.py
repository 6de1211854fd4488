"""Artifact mask codes shared by the simulator and the artifact stages.

A mask is a uint8 image, one value per pixel:

==========  =====  =======================================================
name        value  meaning
==========  =====  =======================================================
GOOD        0      an ordinary pixel
HOT_PIXEL   1      an isolated impulse in one micrograph (hot pixel)
XRAY        2      a pixel of an X-ray / cosmic-ray cluster in one micrograph
DEFECT      3      a fixed detector defect (dead or stuck pixel, row or column)
==========  =====  =======================================================
"""

from __future__ import annotations

__all__ = ["DEFECT", "GOOD", "HOT_PIXEL", "MASK_CODES", "XRAY"]

GOOD = 0
HOT_PIXEL = 1
XRAY = 2
DEFECT = 3

#: Mask value -> name, as written into store attributes and reports.
MASK_CODES = {GOOD: "good", HOT_PIXEL: "hot_pixel", XRAY: "xray", DEFECT: "defect"}
