"""Starting K ranks of a test script as torchrun would, with a deadline so a hang fails the test."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.processes import free_port, without_rendezvous  # noqa: E402


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def fresh_env() -> dict[str, str]:
    """This process's environment for a child that starts a process group of its own, one thread per rank."""
    return {**without_rendezvous(), "OMP_NUM_THREADS": "1"}


def launch(k: int, argv: list[str], workdir: Path, timeout: float = 600.0) -> list[RankResult]:
    """Run ``python argv`` as ranks 0..k-1 of one process group; kill every rank past ``timeout`` seconds."""
    port = free_port()
    procs, logs = [], []
    for rank in range(k):
        env = {
            **fresh_env(),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(k),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
        }
        log = open(workdir / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise
    finally:
        results = []
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            proc.wait()
            log.seek(0)
            results.append(RankResult(rank, proc.returncode, log.read()))
            log.close()
    return results
