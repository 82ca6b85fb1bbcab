"""Ahead-of-time compilation of every kernel x tile config for sm_80 / sm_90 (no GPU needed).

Triton appends two hidden pointer parameters (global and profile scratch) to every
kernel; TensorRT's AOT launcher passes only inputs, extra int32 args and outputs, so
:func:`strip_unused_trailing_params` removes trailing entry parameters the body never
reads, and the cubin is re-assembled from that PTX so both files describe the shipped
kernel. Registers, spills and shared memory come from ``ptxas -v``.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ExportError
from .configs import CONFIGS, KernelSpec, TileConfig, all_specs

SUPPORTED_ARCHS = (80, 86, 89, 90)


def parse_archs(text: str) -> list[int]:
    """``"sm_80,sm_90"`` -> [80, 90]."""
    archs = []
    for part in text.split(","):
        p = part.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not p.isdigit() or int(p) not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"--arch {part.strip()!r} is not supported; use a comma list of "
                + ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS)
            )
        archs.append(int(p))
    if not archs:
        raise ConfigError("--arch is empty; use e.g. sm_80,sm_90")
    return archs


def strip_unused_trailing_params(ptx: str, kernel_name: str) -> tuple[str, int]:
    """Drop trailing ``.param`` entries of ``kernel_name`` that its body never references."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ExportError(f"kernel {kernel_name!r} not found in the PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    body = ptx[m.end() :]
    removed = 0
    while params:
        name = params[-1].split()[-1]
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            break
        params.pop()
        removed += 1
    if not removed:
        return ptx, 0
    new_list = "\n" + ",\n".join("\t" + p for p in params) + "\n"
    return ptx[: m.start(1)] + new_list + ptx[m.end(1) :], removed


#: PTX ISA 8.4 (CUDA 12.4): TensorRT JIT-compiles the PTX with the installed driver, so a
#: lower ISA than Triton's default (9.x for sm_90 with its bundled CUDA 13 ptxas) runs on
#: more drivers (R550+).
PTX_VERSION = 84


def _ptxas(arch: int = 80) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def assemble(ptx: str, arch: int, out: Path) -> dict:
    """ptxas the PTX to ``out``; returns registers / spill bytes / shared memory from ``-v``."""
    ptx_file = out.with_suffix(".ptx")
    ptx_file.write_text(ptx)
    cmd = [_ptxas(arch), "-v", f"--gpu-name={_arch_name(arch)}", str(ptx_file), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ExportError(f"ptxas failed for {ptx_file.name}: {res.stderr.strip()}")
    log = res.stderr + res.stdout

    def grab(pattern: str) -> int:
        mm = re.search(pattern, log)
        return int(mm.group(1)) if mm else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
        "ptxas_smem_bytes": grab(r"(\d+) bytes smem"),
        "ptxas_log": log.strip(),
    }


@dataclass
class CompiledKernel:
    """One compiled kernel: what TensorRT's aot_impl returns plus launch facts."""

    name: str
    ptx: str
    cubin: bytes | None
    num_warps: int
    shared: int
    arch: int
    hidden_params_removed: int


_CACHE: dict[tuple, CompiledKernel] = {}


def compile_kernel(spec: KernelSpec, cfg: TileConfig, arch: int | None = None) -> CompiledKernel:
    """``triton.compile`` one kernel for ``arch`` (None: the current GPU). Cached per process."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import fused_kernels, kernels

    key = (spec.op_type, spec.variant, cfg.name, arch)
    if key in _CACHE:
        return _CACHE[key]
    fn = getattr(kernels, spec.kernel, None) or getattr(fused_kernels, spec.kernel)
    constexprs = spec.constexprs(cfg)
    src = triton.compiler.ASTSource(fn=fn, signature=spec.full_signature(), constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32) if arch is not None else None
    options = {
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "ptx_version": PTX_VERSION,
        "enable_fp_fusion": True,
    }
    if spec.maxnreg:
        options["maxnreg"] = spec.maxnreg
    ck = triton.compile(src, target=target, options=options)
    name = ck.metadata.name
    ptx, removed = strip_unused_trailing_params(ck.asm["ptx"], name)
    out = CompiledKernel(
        name=name,
        ptx=ptx,
        cubin=ck.asm.get("cubin") if not removed else None,
        num_warps=ck.metadata.num_warps,
        shared=ck.metadata.shared,
        arch=ck.metadata.target.arch,
        hidden_params_removed=removed,
    )
    _CACHE[key] = out
    return out


def _arch_name(arch: int) -> str:
    return f"sm_{arch}a" if arch == 90 else f"sm_{arch}"


def compile_all(
    output_dir: str | Path,
    archs: list[int] = (80, 90),
    specs: list[KernelSpec] | None = None,
    configs: list[TileConfig] | None = None,
) -> dict:
    """Compile every spec x config x arch into ``output_dir``; write and return ``summary.json``."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    entries = []
    for arch in archs:
        for spec in specs or all_specs():
            for cfg in configs or CONFIGS:
                ck = compile_kernel(spec, cfg, arch)
                stem = f"{spec.op_type}.{spec.variant}.{cfg.name}.sm{arch}"
                cubin_path = out_dir / f"{stem}.cubin"
                res = assemble(ck.ptx, arch, cubin_path)
                target = next((ln.strip() for ln in ck.ptx.splitlines() if ln.startswith(".target")), "")
                version = next((ln.strip() for ln in ck.ptx.splitlines() if ln.startswith(".version")), "")
                entries.append(
                    {
                        "kernel": spec.op_type,
                        "function": ck.name,
                        "variant": spec.variant,
                        "config": cfg.as_dict(),
                        "block_k": spec.constexprs(cfg)["BLOCK_K"],
                        "arch": f"sm_{arch}",
                        "ptx": f"{stem}.ptx",
                        "cubin": cubin_path.name,
                        "ptx_target": target,
                        "ptx_version": version,
                        "num_warps": ck.num_warps,
                        "block_threads": ck.num_warps * 32,
                        "shared_mem_bytes": ck.shared,
                        "registers": res["registers"],
                        "spill_stores_bytes": res["spill_stores"],
                        "spill_loads_bytes": res["spill_loads"],
                        "stack_bytes": res["stack_bytes"],
                        "hidden_params_removed": ck.hidden_params_removed,
                        "signature": list(spec.signature),
                    }
                )
    summary = {
        "triton_version": triton.__version__,
        "ptx_isa_requested": PTX_VERSION,
        "ptxas": {f"sm_{a}": _ptxas(a) for a in archs},
        "kernels": entries,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    """Markdown table: kernel x variant x config x arch with registers, spills, smem."""
    rows = [
        "| kernel | variant | config | arch | regs | spill st/ld B | smem B | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["kernels"]:
        rows.append(
            f"| {e['kernel']} | {e['variant']} | {e['config']['name']} | {e['arch']} | {e['registers']} | "
            f"{e['spill_stores_bytes']}/{e['spill_loads_bytes']} | {e['shared_mem_bytes']} | {e['ptx_target']} |"
        )
    return "\n".join(rows)
