"""Measure the synthetic population: construction time and memory, query and paging latency.

    python benchmarks/bench_population.py --patients 100000

Prints timings only (no record content: the population is synthetic PHI all the same).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.config import SandboxConfig  # noqa: E402
from sandbox.population.store import Query  # noqa: E402
from sandbox.population.synthetic import SyntheticPopulation  # noqa: E402


def _rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeat: int) -> tuple[float, object]:
    samples = []
    result = None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    before = _rss_mb()
    t = time.perf_counter()
    pop = SyntheticPopulation(SandboxConfig(seed=args.seed, patients=args.patients))
    build_s = time.perf_counter() - t
    counts = pop.counts()
    rows = sum(sum(v.values()) for v in counts.values())
    print(f"patients={args.patients:,} index rows={rows:,}")
    print(f"construct: {build_s:.2f} s, peak RSS {_rss_mb():.0f} MB (before {before:.0f} MB)")

    conn = "riverbend-both"
    now = pop.now
    window = Query(conn, "results", updated_ge=now - timedelta(days=30), updated_lt=now - timedelta(days=1))
    cases = {
        "count results (no filter)": lambda: pop.count(Query(conn, "results")),
        "count results _lastUpdated window": lambda: pop.count(window),
        "page results _lastUpdated window 0..100": lambda: pop.page(window, 0, 100),
        "page results _lastUpdated window deep offset": lambda: pop.page(window, 5_000, 100),
        "page encounters status=finished 0..100": lambda: pop.page(
            Query(conn, "encounters", statuses=["finished"]), 0, 100
        ),
        "page documents 0..100 (notes + C-CDA)": lambda: pop.page(Query(conn, "documents"), 0, 100),
        "counts(live_only=True)": lambda: pop.counts(live_only=True),
    }
    for name, fn in cases.items():
        ms, _ = _timed(fn, args.repeat)
        print(f"{name}: {ms:.2f} ms")
    patient = pop.page(Query(conn, "patients"), 1234 % max(1, counts[conn]["patients"]), 1)[0]
    ms, _ = _timed(lambda: pop.page(Query(conn, "results", patient_id=patient.id), 0, 100), args.repeat)
    print(f"page results of one patient: {ms:.2f} ms")
    ms, _ = _timed(lambda: pop.find_patients(conn, identifier=patient.mrn, id_type="MR"), args.repeat)
    print(f"find_patients by MRN: {ms:.2f} ms")
    ms, _ = _timed(lambda: pop.get(conn, "patients", patient.id), args.repeat)
    print(f"get patient: {ms:.2f} ms")
    t = time.perf_counter()
    changes = pop.advance(1, 0.01)
    print(f"advance(1 day, 1%): {time.perf_counter() - t:.2f} s, {len(changes):,} changes")
    ms, _ = _timed(lambda: pop.page(window, 0, 100), args.repeat)
    print(f"page results _lastUpdated window after advance: {ms:.2f} ms")
    print(f"peak RSS at end: {_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
