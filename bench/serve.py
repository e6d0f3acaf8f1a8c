"""Benchmark: the triage service on loopback with the demo bundle, on SQLite and on PostgreSQL.

    python bench/serve.py [--run runs/bench_demo] [--clients 8] [--seconds 60] [--growth 250] [--exam 250]

Builds the demo run and its bundle when they are missing, draws ISIC 2024-style synthetic lesion crops
(`synth --layout isic2024`, each upload a new image content), and for each database starts
`python cli.py serve` in its own process on a free loopback port, then measures:

- clients: 8 clients for 60 s, each uploading one lesion at a time (every fourth upload starts a new
  patient): p50/p95 latency, requests/s, errors (must be 0), the service's peak RSS;
- growth: one patient grown to 250 lesions one upload at a time: p50/p95 latency of the uploads that
  bring it to 10, 50, 100 and 250 lesions (the five uploads up to each), against uploads into new
  patients (20 of them); target: at 250 within 1.5x of a new patient;
- exam: a 250-lesion exam in one request (seconds; target under 30 s on 2 cores).

Writes bench/results/serve.json: the SQLite figures at the top level (`clients`, `p50_ms`, `p95_ms`,
`requests_per_second`, `errors`, `growth`, `exam`) and the same under `postgresql`.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from common import provenance  # noqa: E402
from pgserver import NoPostgres, throwaway_postgres  # noqa: E402

from rundir.io import write_json  # noqa: E402

LESIONS_PER_PATIENT = 4
TOKEN = "bench=" + "b" * 32
AUTH = {"Authorization": f"Bearer {TOKEN.split('=', 1)[1]}"}
GROWTH_POINTS = (10, 50, 100, 250)
WINDOW = 5  # uploads up to each growth point whose latencies are summarised
NEW_PATIENTS = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bundle(run: Path) -> Path:
    bundle = run / "bundle"
    if not (run / "stack" / "stack_model.json").exists():
        subprocess.run([sys.executable, "cli.py", "demo", "--out", str(run)], cwd=ROOT, check=True)
    if not (bundle / "manifest.json").exists():
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run([sys.executable, "cli.py", "export", "--run", str(run), "--out", str(bundle)], cwd=ROOT, check=True)
    return bundle


def lesion_crops(folder: Path, count: int) -> list[bytes]:
    """`count` distinct ISIC 2024-style lesion crops (JPEG bytes), drawn by the synthetic generator."""
    data = folder / "crops"
    subprocess.run([sys.executable, "cli.py", "synth", "--out", str(data), "--layout", "isic2024", "--train-images", str(count + 50), "--seed", "11"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with h5py.File(data / "train-image.hdf5", "r") as images:
        crops = [bytes(images[key][()]) for key in sorted(images.keys())]
    unique = list(dict.fromkeys(crops))
    if len(unique) < count:
        raise SystemExit(f"only {len(unique)} distinct crops drawn; {count} needed")
    return unique[:count]


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


def _post(http: httpx.Client, patient: str, crops: list[bytes]) -> tuple[float, str | None]:
    """One upload: (seconds, None) or (seconds, the error)."""
    started = time.perf_counter()
    try:
        answer = http.post(f"/api/v1/patients/{patient}/lesions", headers=AUTH, data={"age": "55", "sex": "female", "site": "posterior torso"},
                           files=[("files", (f"crop{i}.jpg", crop, "image/jpeg")) for i, crop in enumerate(crops)])
        error = None if answer.status_code == 200 else f"{answer.status_code}: {answer.text[:200]}"
    except httpx.HTTPError as failure:
        error = repr(failure)
    return time.perf_counter() - started, error


def _ms(values: list[float], percentile: float) -> float | None:
    return round(float(np.percentile(values, percentile)) * 1000, 1) if values else None


def clients_phase(url: str, crops: list[bytes], *, clients: int, seconds: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    until = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            upload = 0
            while time.monotonic() < until:
                crop = crops[(index * 997 + upload) % len(crops)]
                took, error = _post(http, f"clients-{index}-{upload // LESIONS_PER_PATIENT}", [crop])
                (errors.append(error) if error else latencies.append(took))
                upload += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies) + len(errors), "p50_ms": _ms(latencies, 50),
            "p95_ms": _ms(latencies, 95), "requests_per_second": round(len(latencies) / elapsed, 2), "errors": len(errors), "first_errors": errors[:5],
            "lesions_per_patient": LESIONS_PER_PATIENT}


def growth_phase(url: str, crops: list[bytes], *, lesions: int) -> dict[str, object]:
    """Uploads into new patients, then one patient grown one lesion at a time."""
    with httpx.Client(base_url=url, timeout=300) as http:
        new = [_post(http, f"new-{i}", [crops[i]]) for i in range(NEW_PATIENTS)]
        grown = [_post(http, "grown", [crops[NEW_PATIENTS + i]]) for i in range(lesions)]
    errors = [e for _, e in new + grown if e]
    new_seconds, grown_seconds = [t for t, _ in new], [t for t, _ in grown]
    points = [n for n in GROWTH_POINTS if n <= lesions]
    at = {n: grown_seconds[max(0, n - WINDOW): n] for n in points}
    new_p50 = _ms(new_seconds, 50)
    return {
        "lesions": lesions, "new_patient_p50_ms": new_p50, "new_patient_p95_ms": _ms(new_seconds, 95),
        "p50_ms_at": {str(n): _ms(values, 50) for n, values in at.items()}, "p95_ms_at": {str(n): _ms(values, 95) for n, values in at.items()},
        "ratio_p50_at_largest_to_new_patient": round(_ms(at[points[-1]], 50) / new_p50, 2) if new_p50 else None,
        "errors": len(errors), "first_errors": errors[:3],
    }


def exam_phase(url: str, crops: list[bytes]) -> dict[str, object]:
    with httpx.Client(base_url=url, timeout=600) as http:
        took, error = _post(http, "exam", crops)
    return {"lesions": len(crops), "seconds": round(took, 1), "error": error}


def measure(bundle: Path, database: str, work: Path, crops: list[bytes], args: argparse.Namespace) -> dict[str, object]:
    """Start the service on `database` and run the three phases against it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "cli.py", "serve", "--bundle", str(bundle), "--port", str(port), "--database", database, "--store", str(work / "images"), "--token", TOKEN],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stop, peak = threading.Event(), [0]
    try:
        _wait_ready(url, server)
        threading.Thread(target=_peak_rss, args=(psutil.Process(server.pid), stop, peak), daemon=True).start()
        n_growth = NEW_PATIENTS + args.growth
        result = clients_phase(url, crops[: len(crops) - args.exam - n_growth], clients=args.clients, seconds=args.seconds)
        result["growth"] = growth_phase(url, crops[len(crops) - args.exam - n_growth: len(crops) - args.exam], lesions=args.growth)
        result["exam"] = exam_phase(url, crops[len(crops) - args.exam:])
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    return {**result, "peak_rss_mb": round(peak[0] / 2**20)}


def _summary(name: str, result: dict) -> str:
    growth, exam = result["growth"], result["exam"]
    return (f"{name}: {result['clients']} clients p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, {result['requests_per_second']} req/s, "
            f"{result['errors']} errors; growth p50 at {growth['p50_ms_at']} ms vs new patient {growth['new_patient_p50_ms']} ms "
            f"(x{growth['ratio_p50_at_largest_to_new_patient']}); exam of {exam['lesions']} in {exam['seconds']} s; peak RSS {result['peak_rss_mb']} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench_demo")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--growth", type=int, default=250)
    parser.add_argument("--exam", type=int, default=250)
    args = parser.parse_args()
    bundle = _bundle(args.run)
    work = Path(tempfile.mkdtemp(prefix="serve_bench."))
    try:
        crops = lesion_crops(work, 2400 + NEW_PATIENTS + args.growth + args.exam)
        results = {"sqlite": measure(bundle, f"sqlite:///{work / 'sqlite' / 'triage.db'}", work / "sqlite", crops, args)}
        print(_summary("sqlite", results["sqlite"]), flush=True)
        try:
            with throwaway_postgres(work / "postgres") as url:
                results["postgresql"] = measure(bundle, url, work / "pg", crops, args)
                print(_summary("postgresql", results["postgresql"]), flush=True)
        except NoPostgres as why:
            results["postgresql"] = {"skipped": str(why)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json({**provenance(), **results["sqlite"], "postgresql": results["postgresql"], "bundle": str(bundle), "crops": "synth --layout isic2024, 64 px"},
               ROOT / "bench" / "results" / "serve.json")


if __name__ == "__main__":
    main()
