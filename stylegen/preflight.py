"""Preflight of a submitted job: can every node of the cluster reach the run's storage and shards?

``stylegen submit`` runs this as a short job of its own before the real one
(``python -m stylegen.preflight --config _submit/config.toml [--storage URL]``): the job's
driver starts one tiny task on every alive node (pinned with a node-affinity strategy), each
task checks what its node would touch — object-store URLs listed (and the storage written to
with a probe object), local shard paths present, a local storage path writable — and the
driver prints one JSON line ``{"nodes": N, "problems": [...]}``. A local-path storage on a
cluster of more than one node is refused outright: Ray Train needs storage every node can
reach, and a path on each node's own disk is a different place on each node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from stylegen import storage
from stylegen.config import Config, from_dict, load_config, to_dict
from stylegen.errors import UserError

RESULT_PREFIX = "stylegen-preflight: "


def targets(cfg: Config, storage_url: str | None = None) -> list[tuple[str, str]]:
    """``(url, kind)`` pairs to check: kind 'storage' (must be writable) or 'shards' (must be listable)."""
    d = cfg.data
    out = [(storage_url or cfg.ray.storage, "storage")]
    for url in dict.fromkeys([*d.content, *d.style, *d.val_content, *d.val_style]):
        out.append((url, "shards"))
    return out


def shared_storage_problem(storage_url: str, nodes: int) -> str | None:
    """The reason a storage cannot serve a run on ``nodes`` nodes, or None."""
    if nodes > 1 and not storage.is_remote(storage_url):
        return (f"ray.storage {storage_url!r} is a local path but the cluster has {nodes} nodes: each node would "
                "write its own copy and resume would miss checkpoints; use s3://bucket/prefix (or gs://, or a "
                "shared filesystem mounted at the same path on every node)")
    return None


def check_here(items: list[tuple[str, str]], cfg: Config) -> list[str]:
    """What is wrong on this node with each (url, kind); [] when all is reachable."""
    problems = []
    for url, kind in items:
        try:
            if storage.is_remote(url):
                storage.check_access(url, cfg.storage, write=kind == "storage", what=kind)
            elif kind == "storage":
                p = storage.local_path(url)
                p.mkdir(parents=True, exist_ok=True)
                if not os.access(p, os.W_OK):
                    problems.append(f"storage {url!r} is not writable")
            elif not any(c in url for c in "{*?[") and not storage.local_path(url).exists():
                problems.append(f"shards {url!r} do not exist on this node")
        except UserError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{kind} {storage.explain(e, url)}")
    return problems


def _node_task(items: list[tuple[str, str]], cfg_dict: dict) -> tuple[str, list[str]]:
    import ray

    return ray.get_runtime_context().get_node_id(), check_here(items, from_dict(cfg_dict))


def run_on_cluster(cfg: Config, storage_url: str | None = None) -> dict:
    """Run the checks on every alive node (this process is a driver on the cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="ERROR")
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        items = targets(cfg, storage_url)
        task = ray.remote(num_cpus=0, max_retries=0)(_node_task)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            items, to_dict(cfg)) for n in nodes]
        problems: list[str] = []
        shared = shared_storage_problem(storage_url or cfg.ray.storage, len(nodes))
        if shared:
            problems.append(shared)
        for node, found in ray.get(refs, timeout=120):
            problems += [f"node {node[:8]}: {p}" for p in found]
        return {"nodes": len(nodes), "problems": list(dict.fromkeys(problems))}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stylegen.preflight")
    p.add_argument("--config", required=True)
    p.add_argument("--storage", default=None)
    args = p.parse_args(argv)
    result = run_on_cluster(load_config(args.config, []), args.storage)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 1 if result["problems"] else 0


def parse_result(logs: str) -> dict | None:
    """The preflight job's result line from its logs (None when it never printed one)."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


if __name__ == "__main__":
    sys.exit(main())
