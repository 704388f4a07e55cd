"""Pinned CPU kernels: the same float results on any x86-64 machine with AVX2.

torch, MKL, oneDNN, glibc's libm and numpy each pick their kernels by the CPU's instruction
set (SSE, AVX2, AVX-512, FMA), and kernels of different vector widths add floats in other
orders. A toy world trained on an AVX-512 machine then differs from one trained on an AVX2
machine, bit for bit and, after a few thousand steps, in its scores. The demo and the toy
zoo run in processes pinned to one choice instead, the AVX2 level, which every x86-64 CPU
since 2013 (Intel Haswell, AMD Zen / Excavator) has:

  ATEN_CPU_CAPABILITY=avx2      torch's own kernels: the AVX2 build, not AVX-512
  MKL_CBWR=AVX2                 MKL (torch's BLAS): its AVX2 code path, the same on every such CPU
  ONEDNN_MAX_CPU_ISA=AVX2       and oneDNN switched off in-process (its blocking follows the
                                cache sizes), so convolutions go through MKL too
  GLIBC_TUNABLES hwcaps -FMA    libm's exp / log / sin ... without their FMA variants
  NPY_DISABLE_CPU_FEATURES      numpy's dispatched SIMD loops (pycocoevalcap's float64 maths)
  threads                       one by default: reductions in one fixed order

The portable `default` level (no AVX at all) would cover older CPUs too, but measured here it
made the toy world's build about 1.9x slower; the AVX2 level costs nothing measurable
(8.6 s for the reduced world either way). A CPU without AVX2 cannot take this pin:
is_pinned() is False there and describe() says so.

Most of these are read when a process starts (torch reads ATEN_CPU_CAPABILITY at import,
glibc its tunables before main), so a process is pinned by starting it with `pinned_env()`,
not from inside: `reexec_pinned()` restarts the current command that way.
"""

import logging
import os
import sys
from typing import Mapping, Optional, Sequence

PIN_FLAG = "VPGTRANS_PINNED_KERNELS"
HWCAPS_TUNABLE = "glibc.cpu.hwcaps"
# FMA4: AMD's older fused multiply-add, the other variant glibc's libm selects
LIBM_MASK = "-FMA,-FMA4"
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    PIN_FLAG: "1",
}


def _numpy_dispatched_features() -> str:
    """numpy's dispatched SIMD targets that this CPU has: the ones to switch off (naming one
    the CPU lacks is an error in some numpy versions)."""
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return " ".join(name for name in __cpu_dispatch__ if __cpu_features__.get(name))


def _with_libm_mask(tunables: Optional[str]) -> str:
    """GLIBC_TUNABLES with the hwcaps entry replaced by the libm mask (other tunables kept)."""
    kept = [t for t in (tunables or "").split(":") if t and not t.startswith(HWCAPS_TUNABLE + "=")]
    return ":".join(kept + [f"{HWCAPS_TUNABLE}={LIBM_MASK}"])


def pinned_env(base: Optional[Mapping[str, str]] = None, threads: int = 1) -> dict:
    """`base` (default os.environ) with the pinned kernel choice on top: the environment to
    start a pinned process with. Bit-for-bit equal results need the same `threads` too (MKL
    and torch split reductions by thread)."""
    env = dict(os.environ if base is None else base)
    env.update(PINNED, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["GLIBC_TUNABLES"] = _with_libm_mask(env.get("GLIBC_TUNABLES"))
    env["NPY_DISABLE_CPU_FEATURES"] = _numpy_dispatched_features()
    return env


def is_pinned() -> bool:
    """Whether this process was started with pinned_env() (and torch took it)."""
    if os.environ.get(PIN_FLAG) != "1":
        return False
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def apply_in_process() -> None:
    """What a pinned process sets after importing torch (lavis_vpgtrans/__init__ calls it when
    the environment says pinned): oneDNN off, one thread."""
    import torch

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def describe() -> str:
    """One line for logs: the kernel choice this process runs with."""
    import torch

    if is_pinned():
        state = "pinned"
    elif os.environ.get(PIN_FLAG) == "1":
        state = "NOT pinned: this CPU lacks AVX2, its results differ from other machines'"
    else:
        state = "not pinned (results depend on this CPU's instruction set)"
    return (f"CPU kernels {state}: torch {torch.backends.cpu.get_cpu_capability()}, "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}, oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}, "
            f"{torch.get_num_threads()} thread(s)")


def reexec_pinned(module: str, argv: Sequence[str]) -> None:
    """Restarts this process as `python -m module argv...` with pinned_env(), unless it was
    started pinned already (then returns). The restart replaces this process: nothing after
    the call runs in an unpinned process."""
    if os.environ.get(PIN_FLAG) == "1":  # started pinned (or tried: a CPU without AVX2)
        if not is_pinned():
            logging.warning(describe())
        return
    logging.info("restarting with pinned CPU kernels (lavis_vpgtrans.common.kernels)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], pinned_env())
