"""Test session setup.

Without a GPU, the Triton kernels (optional) are tested on CPU tensors through Triton's interpreter, which is
chosen when ``triton.language`` is first imported. Other libraries import it early (``pytorch_lightning`` does,
through torch), so the switch is set here, before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
