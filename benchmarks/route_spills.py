"""Register use of the routing kernel's variants on sm_90, without a GPU.

Compiles ``_softmax_topk_kernel`` ahead of time for sm_90 (H100/H200) with Triton's own
compiler and runs its bundled ``ptxas -v`` on the PTX, printing the spill line of each variant:
plain, selection bias + sigmoid, and group-limited routing at several group counts.

Run: python3 benchmarks/route_spills.py   (Triton 3.6 or newer; no GPU needed)
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from moesaic.kernels import route

SIGNATURE = dict(logits_ptr="*fp32", probs_ptr="*fp32", idx_ptr="*i32", hist_ptr="*i32",
                 bias_ptr="*fp32", T="i32", E="i32", num_blocks="i32")
# (K, tokens per program, experts padded, groups, groups kept); BT * BE <= 2048 as in _blocks
VARIANTS = [(2, 32, 64, 1, 1), (2, 32, 64, 8, 4), (8, 32, 64, 8, 4), (2, 128, 16, 4, 1),
            (8, 8, 256, 8, 4), (8, 8, 256, 32, 4)]


def spill_line(K: int, BT: int, BE: int, G: int, TOPG: int) -> str:
    fn = route._softmax_topk_kernel
    names = fn.arg_names
    consts = dict(K=K, BT=BT, BE=BE, WRITE_HIST=True, HAS_BIAS=True, SIGMOID=True, G=G,
                  TOPG=TOPG, GS=BE // G)
    src = ASTSource(fn=fn, constexprs={(names.index(k),): v for k, v in consts.items()},
                    signature={n: "constexpr" if n in consts else SIGNATURE[n] for n in names})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    ptxas = get_ptxas(90)
    out = subprocess.run([getattr(ptxas, "path", ptxas), "-arch=sm_90a", "-v", f.name, "-o",
                          os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    return next((line.strip() for line in out.stderr.splitlines() if "spill" in line), "?")


def main() -> None:
    print(f"# benchmarks/route_spills.py  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  "
          f"triton {triton.__version__}  {platform.platform()}  target sm_90, 8 warps")
    print(f"{'K':>3}{'BT':>5}{'BE':>5}{'groups':>8}{'kept':>6}  ptxas")
    for K, BT, BE, G, TOPG in VARIANTS:
        print(f"{K:>3}{BT:>5}{BE:>5}{G:>8}{TOPG:>6}  {spill_line(K, BT, BE, G, TOPG)}")


if __name__ == "__main__":
    main()
