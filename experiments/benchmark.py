"""Benchmark the pipeline against its theoretical limit and its peers: ``python experiments/benchmark.py --out DIR``.

On one machine, with one model, batch and optimizer, measures ``single`` (plain Lightning, one process with
all threads), ``single_raw`` (a plain PyTorch loop, the same threads), ``gpipe`` (GPipeStrategy), ``executor``
(this project's executor without Lightning), ``torch_gpipe`` / ``torch_1f1b`` (torch.distributed.pipelining), and
``ddp`` (Lightning's DDP on the same K processes and global batch: data parallelism, for comparison),
``gpipe_dp`` (on 4 or more processes: two data-parallel replicas of a K/2-stage pipeline, each on half the batch),
``gpipe_fsdp`` (the same with ``shard="full"``: each stage's training state split over its two replicas).
Each K starts its K processes once and runs all of its rows in them; ``single`` and ``single_raw`` run in
every K group too, on rank 0 with every core while the other ranks wait, so that Lightning's own cost is
measured in the same minutes as the pipelines it is compared with. Written to DIR: ``benchmark.json``,
``benchmark.md``, four PNG plots, each rank's log under ``logs/`` and a Chrome trace per gpipe row under
``traces/``. ``--quick`` is the small CI preset.

``--emulate`` runs on an emulated device: every block's compute is a timed wait that holds no CPU (forward
``f`` per sample, backward ``2f``, a recompute ``f`` again), so up to 8 processes share this machine's cores
without slowing each other, and each row's exact limit is known (``limit_samples_per_s``): the schedule's
M+K-1 slots of one micro-batch's forward and backward, with free communication.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_report import ALONE, INTERLEAVED, VIRTUAL_STAGES, write_report
from experiments.processes import free_port, without_rendezvous

WORKER = Path(__file__).resolve().parent / "bench_worker.py"


@dataclass
class Config:
    """One benchmark run. Batch and width are chosen so that compute dominates gloo's ~1 ms per message."""

    ks: list[int]
    ms: list[int]
    width: int  # features of every layer
    depth: int  # Linear+ReLU blocks; every stage gets depth // K of them
    batch: int
    timed: int  # timed steps per row and round
    rounds: int  # every row runs this many times, all rows in turn
    device: str
    cores: int
    timeout: float  # seconds for one K group before its ranks are killed
    emulate_ms: float = 0.0  # emulated device: the whole model's forward over the whole batch, in ms; 0: real compute


FULL = {"ks": [2, 4], "ms": [1, 2, 4, 8, 16], "width": 512, "depth": 32, "batch": 512, "timed": 4, "rounds": 2}
DP = 2  # data-parallel replicas of the gpipe_dp rows
# Steps of 10 to 20 ms, on a machine whose speed drifts by 2x within seconds: 16 timed steps per round and five
# rounds, so that strategy_overhead's round-by-round ratios have a median that one slow phase does not decide.
QUICK = {"ks": [2], "ms": [1, 4], "width": 256, "depth": 16, "batch": 128, "timed": 16, "rounds": 5}
# Emulated: one micro-batch's forward on one stage lasts 20 ms at K=4, M=8 and 5 ms at K=8, M=16, long against
# one gloo message (0.3 to 1.8 ms here). The emulated device does not drift, so the quick preset runs once.
EMULATE = {"ks": [2, 4, 8], "ms": [1, 2, 4, 8, 16], "width": 16, "depth": 8, "batch": 64, "timed": 4, "rounds": 2,
           "emulate_ms": 640.0}  # fmt: skip
EMULATE_QUICK = {**EMULATE, "ks": [2, 4], "ms": [4, 8], "timed": 2, "rounds": 1}
WARMUP = 2  # untimed steps at the start of every row: first-call costs, allocator warm-up
OBSERVE_EVERY = 3  # every third step measures the timeline and activations instead of being timed


class BenchmarkError(ValueError):
    """Settings the benchmark cannot run, reported without a traceback."""


def parse(argv: list[str] | None = None) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, the table and the plots")
    parser.add_argument("--quick", action="store_true", help="the small preset (K=2, M in 1, 4; about a minute)")
    parser.add_argument(
        "--emulate", action="store_true", help="emulated device: timed waits of known cost instead of compute"
    )
    parser.add_argument("--emulate-ms", type=float, help="emulated forward of the whole model over the batch (320)")
    parser.add_argument(
        "--device", default="cpu", help="cpu (gloo, one process per stage) or cuda (NCCL, one GPU per stage)"
    )
    parser.add_argument(
        "--k",
        dest="ks",
        type=int,
        nargs="+",
        help="stage counts (default 2 4 on CPU; on CUDA 1, or 2 4 up to the GPU count)",
    )
    parser.add_argument("--m", dest="ms", type=int, nargs="+", help="micro-batch counts (default 1 2 4 8 16)")
    parser.add_argument("--width", type=int, help="layer width (default 512)")
    parser.add_argument("--depth", type=int, help="Linear+ReLU blocks (default 32)")
    parser.add_argument("--batch", type=int, help="samples per step (default 512)")
    parser.add_argument("--timed", type=int, help="timed steps per row and round (default 4)")
    parser.add_argument("--rounds", type=int, help="times every row runs, all rows in turn (default 2)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds one K group may take (default 1200)")
    args = parser.parse_args(argv)
    preset = (EMULATE_QUICK if args.quick else EMULATE) if args.emulate else (QUICK if args.quick else FULL)
    if args.emulate_ms is not None and not args.emulate:
        raise BenchmarkError("--emulate-ms sets the emulated device's cost: add --emulate")
    values = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in preset}
    cfg = Config(**values, device=args.device, cores=len(os.sched_getaffinity(0)), timeout=args.timeout)
    if args.ks is None and cfg.device == "cuda":
        cfg.ks = _cuda_ks()
    check(cfg)
    return cfg, args.out


def _cuda_ks() -> list[int]:
    import torch

    n = torch.cuda.device_count()
    return [k for k in (2, 4, 8) if k <= n] or [1]


def check(cfg: Config) -> None:
    """Refuse settings that cannot give a fair comparison, naming the values."""
    if cfg.device not in ("cpu", "cuda"):
        raise BenchmarkError(f"--device {cfg.device!r}: choose cpu or cuda")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchmarkError(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
        if max(cfg.ks) > torch.cuda.device_count():
            raise BenchmarkError(f"--k {cfg.ks}: this machine has {torch.cuda.device_count()} GPUs, one per stage")
    if cfg.emulate_ms < 0:
        raise BenchmarkError(f"--emulate-ms {cfg.emulate_ms}: need a positive cost")
    sizes = {"width": cfg.width, "depth": cfg.depth, "batch": cfg.batch, "timed": cfg.timed, "rounds": cfg.rounds}
    for name, value in sizes.items():
        if value < 1:
            raise BenchmarkError(f"--{name} {value}: need at least 1")
    for k in cfg.ks:
        if k < 1 or cfg.depth % k:
            raise BenchmarkError(
                f"--k {k} with --depth {cfg.depth}: every stage must get the same number of blocks, so K must be"
                " at least 1 and divide the depth"
            )
    for m in cfg.ms:
        if m < 1 or cfg.batch % m:
            raise BenchmarkError(
                f"--m {m} with --batch {cfg.batch}: micro-batches must be equal (torch.distributed.pipelining"
                " sizes its buffers once), so M must be at least 1 and divide the batch"
            )


def plan(cfg: Config) -> dict[int, list[dict]]:
    """The rows of each process group, keyed by its process count.

    Every group starts with ``single`` and ``single_raw`` (``window``: the group; emulated, the first group
    only), run by rank 0 alone with every core while the other ranks wait. For each M the implementations
    run back to back, so rows compared with each other run close in time (``gpipe_1f1b``, this strategy's 1F1B,
    beside ``torch_1f1b``, which refuses M < K).
    """
    groups: dict[int, list[dict]] = {}
    # Lightning's own cost, measured in each group's window (rank 0 alone, every core) so that the
    # strategy_overhead goal compares rows the machine ran in the same minutes. The emulated device judges
    # the schedule only, and measures it once.
    windows = cfg.ks[:1] if cfg.emulate_ms else cfg.ks
    for k in cfg.ks:
        alone = [{"impl": impl, "k": 1, "m": 1, "checkpoint": "never", "window": k} for impl in ALONE]
        rows = groups.setdefault(k, alone if k in windows else [])
        if k > 1:  # data parallelism on the same K processes and global batch, for comparison
            rows.append({"impl": "ddp", "k": k, "m": 1, "checkpoint": "never"})
        for m in cfg.ms:
            # gpipe then the executor, back to back: strategy_overhead compares them round by round
            order = [("gpipe", "never"), ("executor", "never"), ("gpipe", "always"), ("torch_gpipe", "never")]
            rows += [{"impl": impl, "k": k, "m": m, "checkpoint": mode} for impl, mode in order]
            # this project's 1F1B, then PyTorch's (which refuses M < K), back to back
            rows.append({"impl": "gpipe_1f1b", "k": k, "m": m, "checkpoint": "never"})
            if m >= k:
                rows.append({"impl": "torch_1f1b", "k": k, "m": m, "checkpoint": "never"})
            if m % k == 0 and cfg.depth % (k * VIRTUAL_STAGES) == 0:  # interleaved: M in groups of K, whole chunks
                rows += [{"impl": impl, "k": k, "m": m, "checkpoint": "never"} for impl in INTERLEAVED]
            if k >= 4 and k % DP == 0 and (cfg.batch // DP) % m == 0:  # D x K/D on the same processes
                rows.append({"impl": "gpipe_dp", "k": k, "m": m, "checkpoint": "never", "dp": DP})
                rows.append({"impl": "gpipe_fsdp", "k": k, "m": m, "checkpoint": "never", "dp": DP, "shard": "full"})
    return dict(sorted(groups.items()))


def steps_per_run(timed: int) -> int:
    """Steps for ``timed`` timed ones after the warm-up, skipping the observed steps, and at least one observed."""
    steps, counted = WARMUP, 0
    while counted < timed or steps <= OBSERVE_EVERY:
        counted += steps % OBSERVE_EVERY != 0
        steps += 1
    return steps


def _rows_per_pass(cfg: Config, row: dict) -> int:
    """Samples in one micro-batch (pipelines; a replica's share of the batch in M parts) or in one process's share
    of the batch (ddp)."""
    return cfg.batch // (row["k"] if row["impl"] == "ddp" else row["m"] * row.get("dp", 1))


def threads_per_process(cfg: Config, processes: int) -> int:
    return max(1, cfg.cores // processes)


def run_group(cfg: Config, k: int, rows: list[dict], out: Path) -> list[dict]:
    """Start ``k`` ranks of the worker on ``rows`` and return rank 0's measurements."""
    work, logs = out / "work", out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    threads = threads_per_process(cfg, k)
    spec = {
        "rows": [
            {**row, "microbatch_size": _rows_per_pass(cfg, row), "threads": cfg.cores if row["impl"] in ALONE else threads}
            for row in rows
        ],
        "model": {"width": cfg.width, "depth": cfg.depth, "batch": cfg.batch, "emulate_forward_s": cfg.emulate_ms / 1e3},
        "warmup": WARMUP, "observe_every": OBSERVE_EVERY, "steps": steps_per_run(cfg.timed), "rounds": cfg.rounds,
        "device": cfg.device, "threads": threads,
        "traces": str(out / "traces"), "result": str(work / f"rows_k{k}.json"),
    }  # fmt: skip
    (work / f"spec_k{k}.json").write_text(json.dumps(spec, indent=1))
    env = without_rendezvous()
    env.update(OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(k),
               NODE_RANK="0", PYTHONWARNINGS="ignore")  # fmt: skip
    cmd = [sys.executable, str(WORKER), str(work / f"spec_k{k}.json")]
    with ExitStack() as files:
        procs = []
        for rank in range(k):
            log = files.enter_context(open(logs / f"k{k}_rank{rank}.log", "w"))
            procs.append(
                subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT)
            )
        _wait(procs, cfg.timeout, k, logs)
    return json.loads(Path(spec["result"]).read_text())


def _wait(procs: list[subprocess.Popen], timeout: float, k: int, logs: Path) -> None:
    """Wait for every rank; once one fails or time runs out, end them all and report the first failed rank's log."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    late = [p for p in procs if p.poll() is None]
    for p in late:
        p.kill()
        p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0 and p not in late]
    if failed or late:
        rank = failed[0] if failed else 0
        why = f"rank {rank} exited {procs[rank].returncode}" if failed else f"it ran past --timeout {timeout:.0f} s"
        raise RuntimeError(f"the K={k} group failed: {why}; its log ends:\n{_tail(logs / f'k{k}_rank{rank}.log')}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"(no log at {path})"


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, out = parse(argv)
    except BenchmarkError as error:
        sys.exit(f"benchmark.py: {error}")
    out.mkdir(parents=True, exist_ok=True)
    crowded = [k for k in cfg.ks if cfg.device == "cpu" and k > cfg.cores]
    if crowded:
        print(f"note: K={crowded} runs more processes than this machine's {cfg.cores} cores; they take turns on them")
    start = time.perf_counter()
    rows: list[dict] = []
    for k, group in plan(cfg).items():
        t = time.perf_counter()
        rows += run_group(cfg, k, group, out)
        print(f"{k} process(es): {len(group)} rows in {time.perf_counter() - t:.0f} s", flush=True)
    wall = time.perf_counter() - start
    settings = {**asdict(cfg), "warmup": WARMUP, "observe_every": OBSERVE_EVERY, "steps": steps_per_run(cfg.timed)}
    for path in write_report(rows, settings, wall, out):
        print(path)
    print(f"benchmark took {wall:.0f} s")


if __name__ == "__main__":
    main()
