"""Benchmark: the triage service on loopback with the demo bundle, 8 concurrent clients for 60 s.

    python bench/serve.py [--run runs/bench_demo] [--clients 8] [--seconds 60]

Builds the demo run (`python cli.py demo`) and its bundle when they are missing, starts
`python cli.py serve` in its own process on a free loopback port, and lets each client upload one
lesion at a time (a clinic's patients: every fourth upload starts a new patient, so an upload
re-scores one to four lesions). Writes bench/results/serve.json: p50/p95 latency of a one-lesion
upload, requests per second, errors (must be 0) and the service's peak RSS.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import provenance  # noqa: E402

from rundir.io import write_json  # noqa: E402

LESIONS_PER_PATIENT = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bundle(run: Path) -> Path:
    bundle = run / "bundle"
    if not (run / "stack" / "features.json").exists():
        subprocess.run([sys.executable, "cli.py", "demo", "--out", str(run)], cwd=ROOT, check=True)
    if not (bundle / "manifest.json").exists():
        subprocess.run([sys.executable, "cli.py", "export", "--run", str(run), "--out", str(bundle)], cwd=ROOT, check=True)
    return bundle


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready")


def _peak_rss(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        except psutil.NoSuchProcess:
            return
        time.sleep(0.2)


def _client(url: str, index: int, images: list[Path], until: float, latencies: list[float], errors: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        upload = 0
        while time.monotonic() < until:
            image = images[(index * 7 + upload) % len(images)]
            patient = f"bench-{index}-{upload // LESIONS_PER_PATIENT}"
            started = time.perf_counter()
            try:
                answer = http.post(
                    f"/api/v1/patients/{patient}/lesions", data={"age": "55", "sex": "female", "site": "torso"},
                    files=[("files", (image.name, image.read_bytes(), "image/jpeg"))],
                )
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}: {answer.text[:200]}")
                else:
                    latencies.append(time.perf_counter() - started)
            except httpx.HTTPError as error:
                errors.append(repr(error))
            upload += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_demo")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    bundle = _bundle(args.run)
    images = sorted((args.run / "data" / "jpeg" / "test").glob("*.jpg"))[:64]
    work = args.run / "serve_bench"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "cli.py", "serve", "--bundle", str(bundle), "--port", str(port), "--database", f"sqlite:///{work / 'triage.db'}"],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    stop, peak = threading.Event(), [0]
    try:
        _wait_ready(url, server)
        watcher = threading.Thread(target=_peak_rss, args=(psutil.Process(server.pid), stop, peak), daemon=True)
        watcher.start()
        latencies: list[float] = []
        errors: list[str] = []
        started = time.monotonic()
        clients = [
            threading.Thread(target=_client, args=(url, i, images, started + args.seconds, latencies, errors)) for i in range(args.clients)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    result = {
        **provenance(),
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies) + len(errors),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1) if latencies else None,
        "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1) if latencies else None,
        "requests_per_second": round(len(latencies) / elapsed, 2),
        "errors": len(errors),
        "first_errors": errors[:5],
        "peak_rss_mb": round(peak[0] / 2**20),
        "lesions_per_patient": LESIONS_PER_PATIENT,
        "bundle": str(bundle),
    }
    write_json(result, ROOT / "bench" / "results" / "serve.json")
    print(f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, {result['requests_per_second']} req/s, "
          f"{result['errors']} errors, peak RSS {result['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
