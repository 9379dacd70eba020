"""Colour tables that let image viewers show a label map with the dataset's class names.

Two formats, one entry per class (index ``c`` is label value ``c`` of ``<case>_label.nii.gz``, background 0
transparent):

- ITK-SNAP's label description file (``labels.itksnap.txt``): ``#`` header lines, then one row
  ``IDX -R- -G- -B- -A-- VIS MSH "LABEL"`` per label (colour 0-255, opacity 0-1, visible in slices and in 3D).
  Open it with *Segmentation > Import Label Descriptions* once the label map is loaded as the segmentation.
- 3D Slicer's colour table (``labels.ctbl``): ``# Color table file`` header, then ``index name R G B A`` rows
  (0-255; spaces in names become ``_``, as Slicer requires). Drag it into Slicer with the label map (or load it
  with *Add Data*) and choose it as the label map's lookup table (*Volumes > Display > Lookup Table*).

The functions return text; the prediction writer writes it.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Sequence

__all__ = [
    "ITKSNAP_FILE",
    "SLICER_FILE",
    "colour_tables",
    "itksnap_label_description",
    "label_colours",
    "slicer_colour_table",
]

ITKSNAP_FILE = "labels.itksnap.txt"
SLICER_FILE = "labels.ctbl"
_WHITESPACE = re.compile(r"\s+")

# ITK-SNAP's own first label colours, then more hues (golden-angle steps) for larger label sets.
_PALETTE = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 239, 213),
    (0, 0, 205),
    (205, 133, 63),
    (210, 180, 140),
    (102, 205, 170),
    (0, 0, 128),
)


def label_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """RGB (0-255) of labels ``0 .. num_classes - 1``: black for the background, distinct colours after."""
    colours = [(0, 0, 0)]
    for c in range(1, num_classes):
        if c <= len(_PALETTE):
            colours.append(_PALETTE[c - 1])
        else:
            hue = (c * 0.618033988749895) % 1.0
            colours.append(tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.95)))
    return colours


def _check_names(class_names: Sequence[str]) -> list[str]:
    names = [str(name) for name in class_names]
    if len(names) < 2 or any(not name.strip() for name in names):
        raise ValueError(f"colour tables need the names of at least 2 classes (background first), got {names!r}")
    return names


def itksnap_label_description(class_names: Sequence[str]) -> str:
    """ITK-SNAP label description file for the classes ``class_names`` (background first), as text."""
    names = _check_names(class_names)
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for index, (name, (r, g, b)) in enumerate(zip(names, label_colours(len(names)))):
        shown = 0 if index == 0 else 1
        label = " ".join(name.split()).replace('"', "'")
        lines.append(f'{index:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    "{label}"')
    return "\n".join(lines) + "\n"


def slicer_colour_table(class_names: Sequence[str]) -> str:
    """3D Slicer colour table (``.ctbl``) for the classes ``class_names`` (background first), as text."""
    names = _check_names(class_names)
    lines = ["# Color table file labels.ctbl", f"# {len(names)} values"]
    for index, (name, (r, g, b)) in enumerate(zip(names, label_colours(len(names)))):
        alpha = 0 if index == 0 else 255
        lines.append(f"{index} {_WHITESPACE.sub('_', name.strip())} {r} {g} {b} {alpha}")
    return "\n".join(lines) + "\n"


def colour_tables(class_names: Sequence[str]) -> dict[str, str]:
    """``{file name: text}`` of both colour tables for ``class_names`` (background first).

    Raises:
        ValueError: fewer than 2 names, or an empty name.
    """
    return {ITKSNAP_FILE: itksnap_label_description(class_names), SLICER_FILE: slicer_colour_table(class_names)}
