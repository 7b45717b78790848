"""What the CompoDiff and retrieval benchmarks share: the machine, interleaved timing, where results go.

Timing on a shared machine: the functions compared are called round after round in one process (each round calls
every one once, in turn), so a burst of load from other processes slows all of them alike; the figures are medians
over the rounds, and the ratios are taken both of the medians and, round by round, of the paired samples. The
thread count is set explicitly (never the number of cores: on a busy 2-core machine two threads can run ten times
slower than one), and the load average is recorded with every result.

Full-size results are written under ``benchmarks/results/<machine label>/`` (committed); ``--tiny`` smoke runs under
``benchmarks/results/tiny/`` (ignored by git), so they never overwrite a full-size file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        names = []
    return names[0].strip() if names else (platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The vector-instruction flags that decide which kernels run (AVX2, AVX512, VNNI, BF16 ...)."""
    try:
        flags = re.findall(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "fma")
    return sorted(flag for flag in (flags[0].split() if flags else []) if flag in wanted)


def load_average() -> list[float] | None:
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict:
    """Hardware and versions, recorded in every results file."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def machine_label(device: torch.device) -> str:
    """`amd-epyc-2core`, `nvidia-h100-80gb-hbm3`, ...: the results sub-folder of this machine."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_path(file_name: str, tiny: bool, device: torch.device, label: str | None = None,
                 output: str | os.PathLike | None = None) -> Path:
    if output is not None:
        return Path(output)
    return RESULTS / ("tiny" if tiny else label or machine_label(device)) / file_name


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, load_average_at_end=load_average())
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"# wrote {path}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(functions: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each function, round after round (every round calls each function once)."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def summary(samples: list[float]) -> dict:
    return {"ms_median": round(statistics.median(samples), 3), "ms_min": round(min(samples), 3),
            "samples_ms": [round(value, 3) for value in samples]}


def ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Each function against `baseline`: the ratio of the medians and the median of the round-by-round ratios
    (time / baseline time: below 1 is faster)."""
    result = {}
    for name, values in samples.items():
        if name == baseline:
            continue
        paired = [value / base for value, base in zip(values, samples[baseline])]
        result[name] = {
            "ratio_of_medians": round(statistics.median(values) / statistics.median(samples[baseline]), 4),
            "median_round_ratio": round(statistics.median(paired), 4),
        }
    return result


def set_threads(threads: int) -> None:
    """Intra-op threads for torch (and OpenMP kernels such as oneDNN's), stated rather than inherited."""
    torch.set_num_threads(int(threads))


def print_row(row: dict, keys: list[str]) -> None:
    print(" | ".join(f"{key}={row[key]}" for key in keys if row.get(key) is not None), flush=True)
