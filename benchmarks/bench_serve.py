"""``stylegen serve`` against in-process batched stylize, same images, same torch threads.

Starts ``stylegen serve`` (the shipped model, one replica with ``--num-cpus`` CPUs = torch threads,
batches of up to 8) on 127.0.0.1 in a child process with its own local Ray, then:

- serve_latency_c1: one client, ``--requests`` sequential ``POST /stylize``: p50 / p99 latency.
- serve_img_per_s_c8: ``--phases`` phases of 8 clients each sending ``--rounds`` requests back to
  back: img/s. Baseline: the same 64x64 content/style pairs through ``stylegen.serve.run_model``
  (``controls.stylize_batch``) in this process, ``--rounds`` batches of 8 after each served phase,
  the same torch threads, while the server idles (machine load drifts; alternating makes it hit both). The ratio is the
  share of in-process throughput that survives HTTP, multipart, PNG and Ray Serve; goal >= 0.8.

Loopback only; bounded: every phase has a fixed count and ``--max-seconds`` (default 600) stops
the run; the server (and its Ray) is stopped in all cases. Prints ``name: ours=X baseline=Y ratio=Z``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_serve")


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def images(n: int = 8) -> list[tuple[bytes, bytes]]:
    """n (content, style) PNG pairs at 64x64 (the training size): noise-free gradients and stripes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64] / 63
    pairs = []
    for _ in range(n):
        c = np.stack([x * rng.uniform(80, 255), y * rng.uniform(80, 255), (1 - x * y) * rng.uniform(80, 255)], -1)
        period = int(rng.integers(3, 9))
        s = np.where((((np.arange(64)[:, None] + np.arange(64)) // period) % 2 == 0)[..., None],
                     rng.integers(0, 255, 3), rng.integers(0, 255, 3))
        pairs.append((_png(c), _png(s.astype(float))))
    return pairs


class InProcess:
    """The baseline: the requests' tensors prepared once, then batches of 8 through ``serve.run_model``."""

    def __init__(self, pairs, threads: int):
        import torch

        from stylegen import serve
        from stylegen.loading import load_generator

        torch.set_num_threads(threads)
        self.run_model = serve.run_model
        self.gen, _ = load_generator(None)
        self.items = []
        for c, s in pairs:
            req = serve.parse_request({"content": c, "style": s}, {})
            self.items.append({"req": req, **serve.to_tensors(req)})
        self.round()  # warm-up

    def round(self) -> tuple[int, float]:
        """(images, seconds) of one batch of 8."""
        t0 = time.perf_counter()
        n = len(self.run_model(self.gen, self.items))
        return n, time.perf_counter() - t0


def post(session, base: str, pair) -> tuple[float, int]:
    """(latency, size of the batch the server stylized it in)."""
    t0 = time.perf_counter()
    r = session.post(f"{base}/stylize", files={"content": ("c.png", pair[0]), "style": ("s.png", pair[1])},
                     timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"POST /stylize answered {r.status_code}: {r.text[:200]}")
    return time.perf_counter() - t0, int(r.headers.get("x-stylegen-batch", "0"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30, help="sequential requests at concurrency 1 (default 30)")
    p.add_argument("--rounds", type=int, default=4, help="requests per client per phase at concurrency 8 (default 4)")
    p.add_argument("--phases", type=int, default=3, help="served/baseline phase pairs at concurrency 8 (default 3)")
    p.add_argument("--num-cpus", type=int, default=1, help="replica CPUs = torch threads, both sides (default 1)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop after this long (default 600)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import requests

    from stylegen import procs, serve
    from stylegen.raycluster import free_port

    deadline = time.monotonic() + args.max_seconds
    pairs = images(8)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="sgbench") as tmp:
        logf = Path(tmp) / "serve.log"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop(serve.TOKEN_ENV, None)
        proc = serve.launch(["--host", "127.0.0.1", "--port", str(port), "--num-cpus", str(args.num_cpus),
                             "--max-batch-size", "8", "--temp-dir", str(Path(tmp) / "ray")], env=env, log_path=logf)
        try:
            waited = serve.wait_ready(base, proc, timeout=max(10.0, deadline - time.monotonic()))
            log.info("server ready after %.0f s", waited)
            with requests.Session() as s:
                for pair in pairs[:2]:
                    post(s, base, pair)  # warm-up
                lat = []
                for i in range(args.requests):
                    if time.monotonic() > deadline:
                        break
                    lat.append(post(s, base, pairs[i % len(pairs)])[0])
            lat.sort()
            p50 = statistics.median(lat)
            p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
            print(f"serve_latency_c1: p50={p50 * 1000:.0f}ms p99={p99 * 1000:.0f}ms (n={len(lat)})", flush=True)

            # Concurrency 8: --phases served phases (8 clients, each sending --rounds requests back to back),
            # each followed by a baseline phase of --rounds batches of 8 while the server idles, so load from
            # other work on the machine hits both alike.
            local = InProcess(pairs, args.num_cpus)
            sessions = [requests.Session() for _ in range(8)]
            served_n = served_t = base_n = base_t = 0.0
            batches: list[int] = []

            def client(k: int) -> list[int]:
                return [post(sessions[k], base, pairs[(k + r) % len(pairs)])[1] for r in range(args.rounds)]

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for _ in range(args.phases):
                    if time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    got = [b for bs in pool.map(client, range(8)) for b in bs]
                    served_n, served_t = served_n + len(got), served_t + time.perf_counter() - t0
                    batches += got
                    for _ in range(args.rounds):
                        n, t = local.round()
                        base_n, base_t = base_n + n, base_t + t
            for sess in sessions:
                sess.close()
            served, base_ips = served_n / served_t, base_n / base_t
        finally:
            rc = procs.stop(proc, timeout=60)
            if rc != 0:
                log.warning("stylegen serve exited %s; its log:\n%s", rc, logf.read_text()[-2000:])
    print(f"serve_img_per_s_c8: ours={served:.2f} baseline={base_ips:.2f} ratio={served / base_ips:.2f} "
          f"(baseline: in-process batched stylize, batches of 8, {args.num_cpus} torch thread(s), alternating "
          f"phases; served mean batch {statistics.mean(batches):.1f}; goal >= 0.8)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
