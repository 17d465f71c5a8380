"""Shared pytest setup. The Triton kernels are tested on CPU through Triton's interpreter, which must be
switched on before Triton is first imported anywhere in the process (hence here, not in the test module)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
