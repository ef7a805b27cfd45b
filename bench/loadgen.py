"""Drive load with wrk and turn its text report into numbers.

wrk is the public, widely used HTTP load generator, so anyone can rerun these numbers
against nginx, Varnish or Verge without our code in the loop. We only parse what
`wrk --latency` prints: requests/s, the latency percentiles and the error counters (a run
with socket errors or non-2xx answers is reported, not silently averaged in).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TRANSFER = re.compile(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTALS = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.M)


class WrkError(RuntimeError):
    """wrk failed to run or printed something we cannot read."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, in plain units (ms, bytes)."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    transfer_bytes_per_s: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse the report of `wrk --latency`; raise WrkError if a required line is missing."""
    rps = _RPS.search(text)
    transfer = _TRANSFER.search(text)
    totals = _TOTALS.search(text)
    percentiles = {m[1]: _to_ms(m[2], m[3]) for m in _PERCENTILE.finditer(text)}
    if not (rps and transfer and totals) or not {"50", "99"} <= percentiles.keys():
        raise WrkError(f"cannot parse wrk output (was --latency given?):\n{text}")
    socket = _SOCKET_ERRORS.search(text)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests_per_s=float(rps[1]),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(totals[1]),
        duration_s=_to_ms(totals[2], totals[3]) / 1000.0,
        transfer_bytes_per_s=float(transfer[1]) * _SIZE_UNITS[transfer[2]],
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def wrk_command(
    url: str, *, duration_s: float, connections: int, threads: int, cpus: str | None
) -> list[str]:
    """The exact wrk command line (kept separate so the report can show it)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        url,
    ]
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def run_wrk(
    url: str, *, duration_s: float, connections: int, threads: int, cpus: str | None
) -> WrkResult:
    """Run wrk once against `url` and return its parsed report."""
    argv = wrk_command(
        url, duration_s=duration_s, connections=connections, threads=threads, cpus=cpus
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0:
        raise WrkError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)
