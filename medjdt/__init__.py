"""medjdt: medical image segmentation with soft labels.

Stages of the data flow live in sub-packages: :mod:`medjdt.losses`, :mod:`medjdt.labels`,
:mod:`medjdt.metrics`, :mod:`medjdt.data`, :mod:`medjdt.models` and :mod:`medjdt.reporting`.
"""

__version__ = "0.1.0"
