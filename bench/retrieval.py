"""hnswlib vs exact search (numpy) on synthetic 256-d embeddings clustered like real ones.

Real embeddings are the last hidden layer of the members' head (Linear-ReLU): non-negative,
partly sparse, clustered by source, view and finding, compared by cosine distance. The
synthetic set imitates that: cluster centres (half-normal, a third of the dimensions zeroed
per centre), points = ReLU(centre + noise), held-out queries from the same clusters. On
unclustered Gaussian vectors every method's recall collapses (no neighbour is meaningfully
nearer than another), which says nothing about real use.

For each size: exact search (normalised float32 matrix, one matrix-vector product and a
partial sort per query) against hnswlib (cosine) over a grid of M and ef: build time (all
cores), memory (RSS growth while building), single-query latency (one thread, like the node),
recall@4 against the exact result.

    python -m bench.retrieval --sizes 100000 [--m 8,16,32] [--ef 16,32,64,128,256]
    python -m bench.retrieval --sizes 1000000 --m 16          # slow: run in the background
    python -m bench.retrieval --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

from bench.common import header, median, ms, percentile, table

DIM = 256


def clustered(
    n: int, dim: int = DIM, clusters: int = 2000, spread: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(points [n,dim], cluster of each point); float32, non-negative."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((clusters, dim))).astype(np.float32)
    centres *= rng.random((clusters, dim)) > 1 / 3
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) * spread
        np.maximum(centres[labels[start:stop]] + noise, 0.0, out=out[start:stop])
    return out, labels


def normalised(x: np.ndarray) -> np.ndarray:
    rows: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return rows


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest by cosine (base and queries normalised), best first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        sims = queries[start : start + 256] @ base.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


def exact_one(base: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    sims = base @ query
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def run_size(
    n: int,
    ms_grid: list[int],
    efs: list[int],
    ef_construction: int,
    queries: int,
    k: int,
    threads: int,
    save_dir: Path | None,
) -> tuple[list[list[object]], list[list[object]]]:
    data, _ = clustered(n + queries, seed=n)
    base, q = data[:n], data[n:]
    print(f"- {n:,} items: data {base.nbytes / 1e6:.0f} MB, {queries} held-out queries", flush=True)

    t0 = time.perf_counter()
    base_n = normalised(base)
    q_n = normalised(q)
    truth = exact_topk(base_n, q_n, k)
    t_truth = time.perf_counter() - t0
    lat = []
    for i in range(min(queries, 200)):
        s = time.perf_counter()
        exact_one(base_n, q_n[i], k)
        lat.append(time.perf_counter() - s)
    exact_rows: list[list[object]] = [
        [
            f"{n:,}",
            "exact (numpy)",
            "-",
            "-",
            f"{t_truth:.1f} s for all queries (batched)",
            base_n.nbytes / 1e6,
            "-",
            ms(median(lat)),
            ms(percentile(lat, 95)),
            1.0,
        ]
    ]
    del base_n

    rows: list[list[object]] = []
    for m in ms_grid:
        before = rss_bytes()
        index = hnswlib.Index(space="cosine", dim=base.shape[1])
        index.init_index(max_elements=n, ef_construction=ef_construction, M=m, random_seed=100)
        index.set_num_threads(threads)
        t0 = time.perf_counter()
        index.add_items(base, np.arange(n))
        build = time.perf_counter() - t0
        grown = (rss_bytes() - before) / 1e6
        size_mb = None
        if save_dir is not None:
            path = save_dir / f"hnsw-{n}-{m}.bin"
            index.save_index(str(path))
            size_mb = path.stat().st_size / 1e6
            path.unlink()
        index.set_num_threads(1)  # the node queries one vector at a time
        for ef in efs:
            index.set_ef(max(ef, k))
            found = np.empty((queries, k), dtype=np.int64)
            lat = []
            for i in range(queries):
                s = time.perf_counter()
                labels, _ = index.knn_query(q[i : i + 1], k=k)
                lat.append(time.perf_counter() - s)
                found[i] = labels[0]
            rows.append(
                [
                    f"{n:,}",
                    "hnswlib",
                    m,
                    ef,
                    f"{build:.1f} s ({threads} threads)",
                    grown,
                    size_mb if size_mb is not None else "-",
                    ms(median(lat)),
                    ms(percentile(lat, 95)),
                    recall(found, truth),
                ]
            )
            print(
                f"  M={m} ef={ef}: recall@{k} {rows[-1][-1]:.4f}, {ms(median(lat)):.3f} ms",
                flush=True,
            )
        del index
    return exact_rows, rows


def hospital_rows(sizes: list[int], adds: int, work: Path) -> list[list[object]]:
    """The hospital index as the node keeps it: add() and query() at a given size, with the
    snapshot rewritten after every insert (before) vs at most once a minute (after)."""
    import shutil
    import sqlite3

    from dicom_node.results.hospital_index import HospitalEntry, HospitalIndex, HospitalStore

    rows: list[list[object]] = []
    for n in sizes:
        data, _ = clustered(n + 2 * adds + 20, seed=n + 1)
        for label, interval in (("before", 0.0), ("after", 60.0)):
            folder = work / f"hospital-{n}-{label}"
            store = HospitalStore(folder)
            with sqlite3.connect(store.path) as db:
                db.executemany(
                    "INSERT INTO items (space, sop_instance_uid, sop_class_uid, "
                    "study_instance_uid, series_instance_uid, study_date, probability, "
                    "patient_key, analysed_at, embedding) VALUES "
                    "('bench', ?, '1.2.840.10008.5.1.4.1.1.1', ?, ?, '20240101', 0.5, ?, 0, ?)",
                    [
                        (
                            f"1.2.826.0.1.{i}",
                            f"1.2.826.1.{i}",
                            f"1.2.826.2.{i}",
                            f"p{i}",
                            data[i].tobytes(),
                        )
                        for i in range(n)
                    ],
                )
            start = time.perf_counter()
            index = HospitalIndex(folder, space="bench", dim=DIM, snapshot_interval_s=interval)
            opened = time.perf_counter() - start
            index.add(  # the first insert writes the snapshot in both modes
                HospitalEntry("1.2.826.9.0", "1.2", "1.2.826.8.0", "1.2.826.7.0", None, 0.5, "q0"),
                data[n],
            )
            add_t, query_t = [], []
            for j in range(1, adds + 1):
                entry = HospitalEntry(
                    f"1.2.826.9.{j}", "1.2", f"1.2.826.8.{j}", f"1.2.826.7.{j}", None, 0.5, f"q{j}"
                )
                s0 = time.perf_counter()
                index.add(entry, data[n + j])
                add_t.append(time.perf_counter() - s0)
                s0 = time.perf_counter()
                index.query(data[n + adds + j], 4, "someone", "1.2.826.8.x")
                query_t.append(time.perf_counter() - s0)
            size_mb = index.snapshot_path.stat().st_size / 1e6
            rows.append(
                [
                    f"{n:,}",
                    label,
                    opened,
                    size_mb,
                    ms(median(add_t)),
                    ms(percentile(add_t, 95)),
                    ms(median(query_t)),
                ]
            )
            shutil.rmtree(folder)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--m", default="8,16,32", help="hnswlib M values")
    parser.add_argument("--ef", default="16,32,64,128,256", help="ef_search values")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="2,000 items, one M, two ef")
    parser.add_argument(
        "--hospital", default="", help="hospital index sizes instead, e.g. 1000,10000,100000"
    )
    parser.add_argument("--adds", type=int, default=10, help="hospital: timed inserts")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.m, args.ef, args.queries = "2000", "16", "16,64", 50
    if args.hospital:
        header("Hospital index: insert and query as the node keeps it")
        with tempfile.TemporaryDirectory(prefix="bench-hospital-") as tmp:
            rows = hospital_rows([int(v) for v in args.hospital.split(",")], args.adds, Path(tmp))
        table(
            [
                "items",
                "snapshot",
                "open s",
                "snapshot MB",
                "add p50 ms",
                "add p95 ms",
                "query p50 ms",
            ],
            rows,
        )
        return
    header("Retrieval: hnswlib vs exact search")
    print(
        f"synthetic clustered embeddings, {DIM}-d, cosine; k = {args.k}; "
        f"ef_construction {args.ef_construction}\n",
        flush=True,
    )
    save_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    all_rows: list[list[object]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        exact_rows, rows = run_size(
            n,
            [int(v) for v in args.m.split(",")],
            [int(v) for v in args.ef.split(",")],
            args.ef_construction,
            args.queries,
            args.k,
            args.threads,
            save_dir,
        )
        all_rows += exact_rows + rows
    print()
    table(
        [
            "items",
            "method",
            "M",
            "ef",
            "build",
            "RSS growth MB",
            "file MB",
            "query p50 ms",
            "query p95 ms",
            f"recall@{args.k}",
        ],
        all_rows,
    )


if __name__ == "__main__":
    main()
