"""Which CPU kernels torch runs here, and what a bf16 matrix product costs against float32.

Usage: python scripts/cpu_kernels.py
       ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python scripts/cpu_kernels.py

Prints the vector level PyTorch dispatches to, whether oneDNN reports bf16 support, what
llmbook.utils.cpu_has_native_bf16 concludes, and the median time of one product of the
shape a training step of the book's model is made of (512 x 576 @ 576 x 1536) in float32
and in bfloat16, with their ratio. Run it twice, as above, to see that the AVX2 emulation
really changes the kernels: on a CPU with native bf16 the ratio goes from below 1 to tens.
"""

from __future__ import annotations

import torch
from machine_info import kernel_path

from llmbook.utils import time_call

SHAPE = (512, 576, 1536)


def gemm_seconds(dtype: torch.dtype, repeat: int) -> float:
    m, k, n = SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    return time_call(lambda: a @ b, repeat=repeat, warmup=2)


def main() -> None:
    kernels = kernel_path()
    print(f"environment: {kernels['env'] or 'none of the kernel variables set'}")
    print(f"torch {torch.__version__}, {kernels['threads']} threads, vector level {kernels['capability']}, "
          f"oneDNN bf16 {bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}, native bf16: {kernels['native_bf16']}")
    fp32 = gemm_seconds(torch.float32, repeat=21)
    bf16 = gemm_seconds(torch.bfloat16, repeat=5)
    m, k, n = SHAPE
    print(f"{m}x{k} @ {k}x{n}: float32 {fp32 * 1e3:.2f} ms, bfloat16 {bf16 * 1e3:.2f} ms, bf16 / fp32 = {bf16 / fp32:.1f}")


if __name__ == "__main__":
    main()
