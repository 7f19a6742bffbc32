"""What the self-test runs on: versions, devices, the architectures torch and the extension were
compiled for, and which natasha:: ops have kernels for which device."""
from __future__ import annotations

import os
import platform
import struct
import sys
from typing import Dict, List, Optional

import torch

import natasha_ext
from natasha_ext import _backend

FATBIN_MAGIC = 0xBA55ED50      # header of an embedded CUDA fat binary
_ENTRY_PTX, _ENTRY_ELF = 0x1, 0x2


def natasha_ops() -> List[str]:
    """Names of the natasha:: ops the loaded library registered (sorted)."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("natasha::"))


def kernel_table() -> Dict[str, Dict[str, bool]]:
    """op -> {dispatch key -> has a kernel} for the CPU and CUDA keys. The computed dispatch table
    counts an op registered once for every device (csrc/composite.cpp, CompositeExplicitAutograd)
    as having a CPU and a CUDA kernel."""
    return {op: {key: bool(torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"natasha::{op}", key))
                 for key in ("CPU", "CUDA")} for op in natasha_ops()}


def fatbin_architectures(blob: bytes) -> List[str]:
    """Architectures of the CUDA code embedded in a shared library: 'sm_90' for machine code,
    'compute_90' for PTX (read from the fat binary headers, as cuobjdump --list-elf/--list-ptx
    would; layout: 16-byte header {magic, version, header size, payload size}, then entries
    {kind u16, _, header size u32, payload size u64, ..., arch u32 at byte 28})."""
    found = set()
    start = blob.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        if start + 16 <= len(blob):
            _, _, hsize, size = struct.unpack_from("<IHHQ", blob, start)
            pos, end = start + hsize, min(start + hsize + size, len(blob))
            while hsize == 16 and pos + 32 <= end:
                kind, _, ehsize, payload = struct.unpack_from("<HHIQ", blob, pos)
                arch = struct.unpack_from("<I", blob, pos + 28)[0]
                if ehsize < 32 or not 10 <= arch < 1000:
                    break
                if kind == _ENTRY_ELF:
                    found.add(f"sm_{arch}")
                elif kind == _ENTRY_PTX:
                    found.add(f"compute_{arch}")
                pos += ehsize + payload
        start = blob.find(struct.pack("<I", FATBIN_MAGIC), start + 4)
    return sorted(found, key=lambda a: (int(a.split("_")[1]), a))


def extension_path() -> Optional[str]:
    if os.environ.get("NATASHA_EXT_LIBRARY"):
        return os.environ["NATASHA_EXT_LIBRARY"]
    mod = sys.modules.get("natasha_ext._C")
    return getattr(mod, "__file__", None)


def extension_architectures(path: Optional[str]) -> Optional[List[str]]:
    """CUDA architectures compiled into the extension ([] for a CPU-only build, None if unreadable)."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return fatbin_architectures(fh.read())
    except OSError:
        return None


def describe() -> dict:
    """Everything the report prints before the checks, as a JSON-ready dict."""
    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_GiB": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count})
    path = extension_path()
    return {
        "natasha_ext": {"version": natasha_ext.__version__, "path": os.path.dirname(natasha_ext.__file__)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "gpus": gpus,
        "torch_arch_list": torch.cuda.get_arch_list() if torch.version.cuda else [],
        "extension": {"loaded": bool(_backend.LOADED), "path": path, "load_error": _backend.LOAD_ERROR,
                      "backend": _backend._BACKEND, "fused_devices": sorted(_backend.FUSED_DEVICES),
                      "cuda_architectures": extension_architectures(path)},
        "kernels": kernel_table() if _backend.LOADED else {},
    }


def format_environment(env: dict) -> str:
    ext = env["extension"]
    archs = ext["cuda_architectures"]
    lines = [
        f"natasha_ext {env['natasha_ext']['version']} ({env['natasha_ext']['path']})",
        f"python {env['python']} on {env['platform']}, {env['cpu_threads']} CPU threads",
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}"
        + (f", cuDNN {env['cudnn']}" if env["cudnn"] else "") + ")",
        f"torch compiled for: {' '.join(env['torch_arch_list']) or 'CPU only'}",
    ]
    if env["gpus"]:
        lines += [f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_GiB']} GiB, "
                  f"{g['multiprocessors']} SMs)" for g in env["gpus"]]
    else:
        lines.append("GPU: none visible to torch")
    if ext["loaded"]:
        built = "unreadable" if archs is None else (" ".join(archs) if archs else "no CUDA code (CPU-only build)")
        lines += [f"extension: {ext['path']}", f"extension compiled for: {built}",
                  f"fused devices: {', '.join(ext['fused_devices'])}  (NATASHA_EXT_BACKEND={ext['backend']})"]
    else:
        lines.append(f"extension: NOT loaded ({ext['load_error']}); every op runs its reference")
    if env["kernels"]:
        width = max(len(op) for op in env["kernels"])
        lines += ["", f"{'natasha:: op':{width}}  CPU  CUDA"]
        lines += [f"{op:{width}}  {'yes' if k['CPU'] else ' - '}  {'yes' if k['CUDA'] else ' - '}"
                  for op, k in env["kernels"].items()]
    return "\n".join(lines)
