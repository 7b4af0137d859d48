"""Drives the shared limiter against a simulator that enforces the same limit.

Starts a redis-server, the simulator refusing more than `--rpm` requests per
minute per key, and `--nodes` serve processes sharing one key whose
`rateLimiting.maxRequestsPerMinute` is the same figure. It submits more tasks
than the window allows, and after `--seconds` prints the requests that went
through, the 429s the simulator sent, the achieved rate and the utilisation of
the limit.

    python -m bench.limiter [--rpm 600] [--nodes 3] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from tests.support import (
    FAKE_KEY,
    OwnRedis,
    Process,
    SimulatorProcess,
    clean_env,
    free_port,
    start_command,
)


def measure(rpm: int, nodes: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """Runs one measurement and returns its figures."""
    server = OwnRedis(free_port(), workdir)
    server.start()
    processes: list[Process] = []
    try:
        port = free_port()
        sim = start_command(
            "simulate-api",
            "--port",
            str(port),
            "--latency-ms",
            "50",
            "--rpm",
            str(rpm),
            env=clean_env(),
        )
        processes.append(sim)
        sim.wait_for_event("simulator.listening")
        simulator = SimulatorProcess(f"http://127.0.0.1:{port}", sim)
        config = workdir / "config.json"
        config.write_text(
            json.dumps(
                {
                    "rateLimiting": {
                        "maxRequestsPerMinute": rpm,
                        "maxRequestsPerHour": rpm * 60,
                    }
                }
            )
        )
        env = clean_env()
        env.update(
            ANTHROPIC_API_KEY=FAKE_KEY,
            ANTHROPIC_BASE_URL=simulator.base_url,
            REDIS_URL=server.url,
            MESH_CONFIG=str(config),
            MESH_CONCURRENCY="32",
        )
        for n in range(nodes):
            node = start_command("serve", "--node-id", f"bench-{n}", env=env)
            processes.append(node)
        for node in processes[1:]:
            node.wait_for_event("node.started")
        client = redis.Redis(port=server.port)
        pipe = client.pipeline(transaction=False)
        for n in range(int(rpm * (seconds / 60) * 1.5)):
            pipe.xadd(
                "mesh:tasks", {"task": json.dumps({"id": f"t{n}", "prompt": "x"})}
            )
        started_s = time.monotonic()
        pipe.execute()
        time.sleep(max(0.0, seconds - (time.monotonic() - started_s)))
        done = int(client.xlen("mesh:results"))
        client.close()
        stats = simulator.stats()
        # A sliding window lets the whole limit through at the start of each
        # window, so N started windows allow N times the limit.
        allowed = rpm * math.ceil(seconds / 60)
        return {
            "limit_rpm": rpm,
            "nodes": nodes,
            "seconds": seconds,
            "requests_answered": stats["by_status"].get("200", 0),
            "results": done,
            "responses_429": stats["by_status"].get("429", 0),
            "achieved_rpm": round(done / seconds * 60, 1),
            "utilisation": round(done / allowed, 3),
        }
    finally:
        for process in processes:
            process.popen.terminate()
        for process in processes:
            try:
                process.wait(timeout_s=30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Prints the figures; exits 1 when a 429 came back or utilisation < 95 %."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=600, help="the limit (default 600)")
    parser.add_argument(
        "--nodes", type=int, default=3, help="serve processes (default 3)"
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="how long to measure (default 60)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as workdir:
        figures = measure(args.rpm, args.nodes, args.seconds, Path(workdir))
    for key, value in figures.items():
        print(f"{key:<18} {value}")
    good = figures["responses_429"] == 0 and figures["utilisation"] >= 0.95
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
