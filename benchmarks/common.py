"""Shared benchmark machinery: side-by-side timing, statistics, machine record, output files.

Every suite measures its candidates interleaved in one process (A B C A B C ..., the starting
candidate rotating each round) after a warm-up, and reports the median and spread (IQR and
min-max) of the per-call seconds. Results go to `<out>/<suite>.json` and `<out>/<suite>.md`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def base_parser(suite: str, description: str) -> argparse.ArgumentParser:
    """Arguments every suite accepts."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{suite}", description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke run)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (JSON + markdown)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default per suite)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default per suite)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and remember the arguments (recorded as the command in the results)."""
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply threads/seed; resolve device and dtype ("auto" rules in `base_parser`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False; use cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    return device, dtype


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Time each candidate side by side: `warmup` untimed rounds, then `repeats` rounds of
    A B C ..., the first candidate rotating each round. Returns name -> seconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of per-call seconds."""
    s = sorted(seconds)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {
        "median_s": statistics.median(s),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": s[0],
        "max_s": s[-1],
        "n": len(s),
    }


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ratios num[i] / den[i] (paired, same round): median and min-max."""
    r = sorted(a / b for a, b in zip(num, den))
    return {"median": statistics.median(r), "min": r[0], "max": r[-1]}


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> bool:
    """Make the resident size track live tensors: serve allocations >= 64 KiB by mmap (returned
    to the OS on free) and trim the heap. glibc only; True if it applied. Call after timing:
    it changes allocation costs for the rest of the process."""
    gc.collect()
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    )
    libc.malloc_trim(0)
    return ok


def peak_memory(
    fn: Callable[[], Any], device: torch.device, prepare: Callable[[], Any] | None = None
) -> tuple[int, str]:
    """Peak bytes that one call of `fn` adds on top of what is allocated after `prepare()`.

    CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    memory_allocated() before (tensors only, exact).
    CPU (Linux, glibc): allocations >= 64 KiB are switched to mmap so freed tensors leave the
    resident set, the resident-set high-water mark (VmHWM) is reset through
    /proc/self/clear_refs, and VmHWM after the call minus VmRSS before it is reported (whole
    process, page granularity: within ~1 MiB run to run). tracemalloc cannot see torch's
    allocations. Fallback: the ru_maxrss delta (only sees peaks above all earlier ones).
    Returns (bytes, method).
    """
    if prepare is not None:
        prepare()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda.max_memory_allocated"
    mmap = _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        if before is not None and peak is not None:
            how = "VmHWM - VmRSS (clear_refs reset" + (", mmap >= 64 KiB)" if mmap else ")")
            return max(0, peak - before) * 1024, how
    except OSError:
        pass
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after_max - before_max) * 1024, "ru_maxrss delta"


# ----------------------------------------------------------------------------------------------
# machine record and output
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name (Linux), else the platform's processor or machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load() -> float | None:
    """1-minute load average (other processes compete for the cores), or None."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, load, torch/transformers versions, device name, date, commit."""
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": _load(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_capability"] = list(torch.cuda.get_device_capability(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_model"]
    return info


# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; matched by
# substring of torch.cuda.get_device_name, first match wins (so "H100 PCIe" before "H100").
DENSE_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 (no bf16 on V100)
)


def dense_bf16_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak FLOP/s of a CUDA device by name, or None if unknown."""
    for key, peak in DENSE_BF16_PEAK:
        if key.lower() in device_name.lower():
            return peak
    return None


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(
    suite: str, args: argparse.Namespace, payload: dict[str, Any], markdown: str
) -> Path:
    """Write `<out>/<suite>.json` (command, machine, settings, results) and `<out>/<suite>.md`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks." + suite, *getattr(args, "argv", sys.argv[1:])])
    payload = {"suite": suite, "command": command, "invoked_as": " ".join(sys.argv), **payload}
    payload["machine"]["load_average_1m_end"] = _load()
    path = out / f"{suite}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    load = f"{m['load_average_1m']}→{m['load_average_1m_end']}"
    head = (
        f"# benchmark `{suite}`\n\n`{payload['command']}`  \n"
        f"{m['date']} · {m['device_name']} · {m['cpu_cores']} cores, {m['torch_threads']} "
        f"threads · torch {m['torch']} · transformers {m['transformers']} · 1-min load {load}"
        "\n\n"
    )
    (out / f"{suite}.md").write_text(head + markdown + "\n")
    return path


def fmt_ms(s: dict[str, float]) -> str:
    """'median [q1-q3]' in milliseconds."""
    return f"{s['median_s'] * 1e3:.1f} [{s['q1_s'] * 1e3:.1f}–{s['q3_s'] * 1e3:.1f}]"


def run_shape_suite(
    suite: str,
    description: str,
    argv: list[str] | None,
    pick_shapes: Callable[[argparse.Namespace, torch.device], list[Any]],
    bench_shape: Callable[..., dict[str, Any]],
    markdown: Callable[[list[dict[str, Any]], torch.dtype], str],
    add_shape_arg: Callable[[argparse.ArgumentParser], None],
) -> int:
    """The driver shared by the per-shape suites (layer, flops): parse arguments, measure every
    shape with `bench_shape(shape, device, dtype, warmup, repeats)`, write <suite>.json/.md."""
    p = base_parser(suite, description)
    add_shape_arg(p)
    args = parse_args(p, argv)
    device, dtype = setup(args)
    shapes = pick_shapes(args, device)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (2 if args.quick else (20 if device.type == "cuda" else 5))
    info = machine(device)
    results = [bench_shape(s, device, dtype, warmup, repeats) for s in shapes]
    payload = {
        "machine": info,
        "settings": {
            "dtype": str(dtype),
            "warmup": warmup,
            "repeats": repeats,
            "quick": args.quick,
        },
        "results": results,
    }
    path = write_results(suite, args, payload, markdown(results, dtype))
    print(f"{suite}: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0
