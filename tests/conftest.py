"""Test-session setup shared by every test file."""
import os

import torch

# Without a GPU the Triton kernels run in the interpreter, which must be selected before
# triton is first imported; with a GPU they run compiled (and interpreter-only tests skip).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
