"""Shared pytest setup. The Triton kernels are tested on CPU through Triton's interpreter, which must be
switched on before Triton is first imported anywhere in the process (hence here, not in the test module)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def _widen_bf16_dot_operands_in_interpreter() -> None:
    """Triton's interpreter (3.6-3.9) multiplies bf16 ``tl.dot`` operands as their raw uint16 bits
    (``np.matmul`` on the storage), so a kernel that rounds its tiles to bf16 before a product
    (``RWKV7_WKV_DOT_PREC=bf16``) gets garbage on CPU. The GPU is right; here the operands are widened
    to fp32 first (exact: bf16 is the top half of an fp32), which is what the tensor cores compute."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


_widen_bf16_dot_operands_in_interpreter()
