"""What this CPU can multiply natively (bf16), asked once per process.

Lives at the bottom layer (``ops``) because the fused loss (``head_loss``) asks it as well as the
training dtype policy (``cpu_policy.training_dtype``)."""

from __future__ import annotations

import functools

import torch


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 instructions that multiply bf16 natively (AMX tiles, AVX512-BF16 dots)
BF16_CAPABILITIES = ("AVX512",)  # ATen's vector kernels that run bf16 elementwise work at full width


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 instruction sets this CPU reports (``BF16_FLAGS`` found in
    ``torch.cpu.get_capabilities()``, cpuinfo's view, else in ``/proc/cpuinfo``'s flags)."""
    found: set[str] = set()
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            c = caps()
            found |= {f for f in BF16_FLAGS if c.get(f)}
        except Exception:  # an old or unusual build: fall back to the kernel's view
            pass
    if not found:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        found |= set(line.split(":", 1)[1].split()) & set(BF16_FLAGS)
                        break
        except OSError:
            pass
    return sorted(found)


def best_times(fns, tries: int, calls: int = 1) -> list[float]:
    """The best of ``tries`` timings (seconds for ``calls`` calls) of each function in ``fns``, the
    functions alternating try by try, so a slow spell of the machine hits them alike."""
    import time

    best = [float("inf")] * len(fns)
    for _ in range(tries):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _bf16_probe(n: int = 256, k: int = 1024, tries: int = 3) -> float:
    """fp32 / bf16 time of one ``[n, k] @ [k, k]`` matmul (best of ``tries`` each, alternating):
    above 1 when bf16 multiplies faster. ~20 ms where bf16 is native."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g)
    b = torch.randn(k, k, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        t32, t16 = best_times((lambda: torch.mm(a, b), lambda: torch.mm(a16, b16)), tries)
    return t32 / max(t16, 1e-9)


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively, so that training under CPU bf16 autocast is faster
    than fp32 (asked once per process).

    The rule, and why: (1) the CPU reports AMX-BF16 or AVX512-BF16 (``cpu_bf16_flags``): without
    them oneDNN emulates bf16 products through fp32 conversions and PyTorch's bf16 GEMM was ~300x
    slower than fp32 on AVX2 machines; (2) ATen runs its AVX512 kernels here
    (``torch.backends.cpu.get_cpu_capability()``; not when ``ATEN_CPU_CAPABILITY`` caps it or the
    build lacks them), so the elementwise work around the GEMMs keeps full vector width; (3) oneDNN
    is in this build (``torch.backends.mkldnn``), which is what multiplies bf16 matrices on CPU; (4) a
    timed probe (one 256x1024x1024 matmul each way, best of three, ~20 ms) finds bf16 faster than
    fp32, which catches a hypervisor that reports the flags but traps the instructions, or a build
    that does not reach them. Measured: AMX 2,100 vs 370 GFLOP/s fp32 (2 threads), AVX512-BF16 (AMD
    Zen 5, 2 threads) ~2-4x fp32 on the 270M's shapes."""
    if not cpu_bf16_flags():
        return False
    if torch.backends.cpu.get_cpu_capability() not in BF16_CAPABILITIES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return _bf16_probe() > 1.0
    except RuntimeError:
        return False
