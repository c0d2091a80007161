"""What both benchmarks measure with: a clock, peak memory above a baseline, one case per fresh process.

CPU: time is the process's CPU time (user + system, all threads): on a shared machine wall time also
counts the time spent waiting for a core. Peak memory is the peak resident set size (VmHWM, reset
through /proc/self/clear_refs at `PeakMemory.start`) minus the resident size at that moment.
CUDA: wall time after synchronising, and torch.cuda.max_memory_allocated above the allocated memory
at `start`.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def clock_name(device_name: str) -> str:
    return ("wall clock" if device_name.startswith("cuda") else
            "process CPU time (user + system; on a shared machine wall time also counts waiting for a core)")


def memory_name(device_name: str) -> str:
    return ("torch.cuda.max_memory_allocated above the memory allocated at the start" if device_name.startswith("cuda")
            else "peak resident set size (VmHWM, reset via /proc/self/clear_refs) above the resident size at the start")


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def check_supported(device_name: str) -> None:
    if not device_name.startswith("cuda") and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("error: CPU peak memory needs Linux's /proc/self/clear_refs: "
                         "run on Linux, or with --device cuda")


class PeakMemory:
    """Peak bytes above the level at `start()`."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def run_worker(module: str, payload: dict) -> dict:
    """Run `python -m module --worker JSON` (from the repository root) in a fresh process; its last stdout
    line is the JSON result."""
    from configs.paths import REPO_ROOT

    # a fixed malloc threshold: every block over 256 KiB is its own mapping, returned to the system when
    # freed, so the resident set size follows what torch holds (glibc's adaptive threshold keeps blocks
    # of up to 32 MiB on its heap once they have been freed, which would hide them from the peak)
    env = {**os.environ, "PYTHONHASHSEED": "0", "MALLOC_MMAP_THRESHOLD_": "262144",
           "MALLOC_TRIM_THRESHOLD_": "262144", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(payload)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_common_arguments(parser) -> None:
    """The flags both benchmarks take, with the shared defaults (batch 4 x 512 tokens, 128 answer tokens)."""
    import argparse

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1024, help="--logits_chunk_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def machine(threads: int) -> str:
    import platform

    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{threads} torch threads{load}")
