"""Data sets and images.

- :mod:`.sets`: data sets held in memory (``"digits"``, folders, zips, ``.npz``) and the images
  ``autoguide generate`` wrote.
- :mod:`.stream`: the same sources streamed one image at a time (data sets of any size).
- images (uint8 <-> float, PNG decoding, grids) are re-exported from :mod:`autoguide_fast.images`.
- :mod:`.archive`: bounded reading of zip entries.
- :mod:`.tool`: the dataset tool (``autoguide dataset convert|encode``).
"""

from ..images import read_png, save_grid, to_float, to_uint8
from .archive import read_entry
from .sets import MAX_CLASSES, ImageDataset, load_dataset, read_images, read_npz
from .stream import ImageFiles, open_images

__all__ = [
    "MAX_CLASSES",
    "ImageDataset",
    "ImageFiles",
    "load_dataset",
    "open_images",
    "read_entry",
    "read_images",
    "read_npz",
    "read_png",
    "save_grid",
    "to_float",
    "to_uint8",
]
