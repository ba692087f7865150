"""The benchmark's summary ratios, its goals, and what it writes: benchmark.json, benchmark.md and PNG plots."""

from __future__ import annotations

import json
import platform
import re
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_gpipe.advisor.choose import format_bytes

Key = tuple[str, int, int, str]  # impl, k, m, checkpoint
#: The issue's goals: gpipe/torch_gpipe (and what it aims at), efficiency/theory, gpipe/executor,
#: activation always/never and time always/never for stages of at least ``MIN_LAYERS`` layers.
TORCH_GOAL, TORCH_AIM, EFFICIENCY_GOAL, OVERHEAD_GOAL = 1.0, 1.1, 0.9, 0.95
MEMORY_GOAL, TIME_GOAL, MIN_LAYERS = 1 / 3, 1.35, 8
#: On the emulated device: gpipe against the exact limit and against torch's ScheduleGPipe.
LIMIT_GOAL, EMULATED_TORCH_GOAL = 0.9, 0.97
#: Interleaved 1F1B over F-then-B at K=4, M=4 (v=2; theory 7 / 5.5 = 1.27), on the emulated device.
INTERLEAVED_GOAL, INTERLEAVED_POINT = 1.15, (4, 4)
#: Each schedule judged on the emulated device: this strategy's row, its goals' infix, PyTorch's matching row.
EMULATED_SCHEDULES = (("gpipe", "", "torch_gpipe"), ("gpipe_1f1b", "_1f1b", "torch_1f1b"),
                      ("gpipe_interleaved", "_interleaved", "torch_interleaved"))  # fmt: skip
#: Rows of one process with every core, measured in each K group's window (``row["window"]``: that K).
ALONE = ("single", "single_raw")
#: Interleaved 1F1B, this strategy's and PyTorch's, with this many model chunks per rank.
INTERLEAVED, VIRTUAL_STAGES = ("gpipe_interleaved", "torch_interleaved"), 2


def theoretical_efficiency(k: int, m: int) -> float:
    """GPipe's busy fraction with equal stages and free communication: M / (M+K-1)."""
    return m / (m + k - 1)


def alone(rows: list[dict], impl: str, window: int | None = None) -> dict | None:
    """The ``single`` or ``single_raw`` row measured in K=``window``'s group; without a window, the fastest."""
    found = [r for r in rows if r["impl"] == impl and window in (None, r.get("window", 1))]
    return max(found, key=lambda r: r["samples_per_s"], default=None)


def lightning_cost(rows: list[dict]) -> float | None:
    """single / single_raw samples per second, the fastest of each: Lightning's own loop against a plain PyTorch
    loop."""
    single, raw = alone(rows, "single"), alone(rows, "single_raw")
    return None if single is None or raw is None else single["samples_per_s"] / raw["samples_per_s"]


def paired(row: dict, peer: dict) -> float:
    """``row``'s speed over ``peer``'s, round by round (the two ran back to back in each), median over rounds."""
    return statistics.median(p / r for r, p in zip(row["step_s_rounds"], peer["step_s_rounds"]))


def summarize(rows: list[dict], depth: int) -> dict[str, Any]:
    """Ratios between rows (see the module's goals) and whether each goal is met at every measured point.

    The strategy_overhead goal holds each K's gpipe / executor against single / single_raw measured in the
    same K group's window.
    """
    by: dict[Key, dict] = {(r["impl"], r["k"], r["m"], r["checkpoint"]): r for r in rows if r["impl"] not in ALONE}
    gpipe = sorted((r for r in rows if r["impl"] == "gpipe"), key=lambda r: (r["k"], r["m"], r["checkpoint"]))
    never = [r for r in gpipe if r["checkpoint"] == "never"]

    def versus(peer: str, impl: str = "gpipe") -> list[dict]:
        """``impl``'s samples per second over ``peer``'s, at each (K, M) both measured, without re-materialization;
        and ``paired``, the same round by round."""
        mine = [by[key] for key in sorted(by) if key[0] == impl and key[3] == "never"]
        pairs = [(r, by.get((peer, r["k"], r["m"], "never"))) for r in mine]
        return [
            _point(r, ratio=r["samples_per_s"] / p["samples_per_s"], paired=paired(r, p)) for r, p in pairs if p is not None
        ]

    efficiency = []
    for r in gpipe:
        measured, theory = 1 - r["bubble_measured"], theoretical_efficiency(r["k"], r["m"])
        efficiency.append(_point(r, measured=measured, theory=theory, ratio=measured / theory))
    memory = []
    for r in never:
        a = by.get(("gpipe", r["k"], r["m"], "always"))
        if a is not None:
            memory.append(
                {
                    "k": r["k"],
                    "m": r["m"],
                    "layers_per_stage": depth // r["k"],
                    "activation_ratio": a["activation_bytes_max"] / r["activation_bytes_max"],
                    "time_ratio": r["samples_per_s"] / a["samples_per_s"],
                }
            )
    singles = {r.get("window", 1): r for r in rows if r["impl"] == "single"}
    per_k = []  # single / single_raw in each K group: its fastest rounds, and round by round
    for w, single in sorted(singles.items()):
        raw = alone(rows, "single_raw", w)
        if raw is not None:
            per_k.append({"k": w, "ratio": single["samples_per_s"] / raw["samples_per_s"], "paired": paired(single, raw)})
    cost = {e["k"]: e["paired"] for e in per_k}
    summary: dict[str, Any] = {
        "gpipe_vs_torch_gpipe": versus("torch_gpipe"),
        "gpipe_vs_torch_1f1b": versus("torch_1f1b"),
        "gpipe_1f1b_vs_torch_1f1b": versus("torch_1f1b", "gpipe_1f1b"),
        "gpipe_1f1b_vs_gpipe": versus("gpipe", "gpipe_1f1b"),
        "gpipe_interleaved_vs_torch_interleaved": versus("torch_interleaved", "gpipe_interleaved"),
        "gpipe_interleaved_vs_gpipe": versus("gpipe", "gpipe_interleaved"),
        "gpipe_vs_executor": versus("executor"),
        "efficiency_vs_theory": efficiency,
        "checkpoint_always_vs_never": memory,
        "gpipe_vs_single": [
            _point(r, ratio=r["samples_per_s"] / singles[r["k"]]["samples_per_s"]) for r in gpipe if r["k"] in singles
        ],
        # what Lightning's own loop costs against a plain PyTorch loop: the fastest rows, and in each K's window
        "single_vs_single_raw": lightning_cost(rows),
        "single_vs_single_raw_per_k": per_k,
        "vs_limit": [
            {"impl": r["impl"], **_point(r, ratio=r["samples_per_s"] / r["limit_samples_per_s"])}
            for r in rows
            if "limit_samples_per_s" in r
        ],
    }
    judged = [e for e in memory if e["layers_per_stage"] >= MIN_LAYERS]
    if summary["vs_limit"]:  # the emulated device: each schedule against its exact limit and PyTorch's
        summary["goals"] = {}
        for impl, name, peer in EMULATED_SCHEDULES:
            summary["goals"][f"emulated{name}_limit"] = _goal(
                [e for e in summary["vs_limit"] if e["impl"] == impl],
                lambda e: e["ratio"] >= LIMIT_GOAL,
                f"{impl} samples per second / limit_samples_per_s >= {LIMIT_GOAL}",
            )
            summary["goals"][f"emulated{name}_vs_{peer}"] = _goal(
                summary[f"{impl}_vs_{peer}"],
                lambda e: e["ratio"] >= EMULATED_TORCH_GOAL,
                f"{impl} / {peer} samples per second >= {EMULATED_TORCH_GOAL}",
            )
        summary["goals"] |= {
            "emulated_interleaved_vs_gpipe": _goal(
                [e for e in summary["gpipe_interleaved_vs_gpipe"] if (e["k"], e["m"]) == INTERLEAVED_POINT],
                lambda e: e["ratio"] >= INTERLEAVED_GOAL,
                f"gpipe_interleaved (v={VIRTUAL_STAGES}) / gpipe samples per second >= {INTERLEAVED_GOAL} at K, M ="
                f" {INTERLEAVED_POINT}",
            ),
        }
        return summary
    summary["goals"] = {
        "gpipe_vs_torch_gpipe": _goal(
            summary["gpipe_vs_torch_gpipe"],
            lambda e: e["ratio"] >= TORCH_GOAL,
            f"gpipe / torch_gpipe samples per second >= {TORCH_GOAL}, aiming at {TORCH_AIM}",
            aim=lambda e: e["ratio"] >= TORCH_AIM,
        ),
        "efficiency_vs_theory": _goal(
            efficiency,
            lambda e: e["ratio"] >= EFFICIENCY_GOAL,
            f"(1 - bubble measured) / (M / (M+K-1)) >= {EFFICIENCY_GOAL}",
        ),
        "lightning_overhead": _goal(
            summary["gpipe_vs_executor"],
            lambda e: e["ratio"] >= OVERHEAD_GOAL,
            f"gpipe / executor samples per second >= {OVERHEAD_GOAL}",
        ),
        "strategy_overhead": _goal(
            [e for e in summary["gpipe_vs_executor"] if e["k"] in cost],
            lambda e: e["paired"] >= OVERHEAD_GOAL * cost[e["k"]],
            f"gpipe / executor >= {OVERHEAD_GOAL} x (single / single_raw, measured in the same K group): the"
            f" strategy adds at most {1 - OVERHEAD_GOAL:.0%} beyond Lightning's own loop. Each ratio round by round"
            " (the two rows back to back), median over rounds",
        ),
        "checkpoint_memory": _goal(
            judged,
            lambda e: e["activation_ratio"] <= MEMORY_GOAL and e["time_ratio"] <= TIME_GOAL,
            f"activation always / never <= 1/3 with step time always / never <= {TIME_GOAL},"
            f" stages of >= {MIN_LAYERS} layers",
        ),
    }
    return summary


def _point(row: dict, **values: float) -> dict:
    return {"k": row["k"], "m": row["m"], "checkpoint": row["checkpoint"], **values}


def _goal(entries: list[dict], ok: Callable[[dict], bool], target: str, aim: Callable | None = None) -> dict:
    goal: dict[str, Any] = {
        "target": target,
        "met": bool(entries) and all(ok(e) for e in entries),
        "missed_at": [{key: e[key] for key in ("k", "m", "checkpoint") if key in e} for e in entries if not ok(e)],
    }
    if aim is not None:
        goal["aim_met"] = bool(entries) and all(aim(e) for e in entries)
    return goal


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "lightning": metadata.version("lightning"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else format_bytes(n)


def _mib(n: float | None) -> str:
    return _fmt(None if n is None else n / 2**20, ".1f")


def _met(flag: bool) -> str:
    return "met" if flag else "**missed**"


def markdown(report: dict[str, Any]) -> str:
    cfg, mach = report["config"], report["machine"]
    lines = [
        "# Benchmark",
        "",
        (
            f"Measured {mach['date']} on {mach['cpu']}, {cfg['cores']} cores, device {cfg['device']};"
            f" torch {mach['torch']}, lightning {mach['lightning']}, Python {mach['python']}."
            f" Whole run: {report['wall_s']:.0f} s."
        ),
        "",
        (
            (
                f"Model: {cfg['depth']} emulated blocks (a timed wait holding no CPU; the whole model's forward over"
                f" the batch {cfg['emulate_ms']:.0f} ms, backward twice that, a recompute once more),"
                if cfg.get("emulate_ms")
                else f"Model: {cfg['depth']} blocks of Linear({cfg['width']}, {cfg['width']}) + ReLU,"
            )
            + f" batch {cfg['batch']}, SGD,"
            f" mean-squared error, stages of {cfg['depth']} / K blocks. Each row ran {cfg['rounds']} time(s) (rounds:"
            f" all rows in turn, then again), {cfg['steps']} steps each time: {cfg['warmup']} warm-up, every step"
            f" divisible by {cfg['observe_every']} observed (timeline and activation meter), the others timed."
            " A round's step time is the median of its timed steps; samples/s = batch / the fastest round's"
            " (other work on a shared machine only slows a round)."
        ),
        "",
        *_overview_table(report["rows"]),
        "",
        *_ratios_table(report["summary"]),
        "",
        *_goals_table(report["summary"]["goals"]),
        "",
        *_cpu_table(report["rows"]),
        "",
        "All rows:",
        "",
        *_rows_table(report["rows"]),
    ]
    lines += [
        "",
        (
            "bubble measured: the median over observed steps of the mean over stages of 1 - (compute time) / (the"
            " step's makespan), from the executor's timeline; n/a where no timeline exists (torch.distributed.pipelining"
            " exposes none). efficiency: 1 - bubble measured, over the theoretical M / (M+K-1). Throughput ratios"
            " compare checkpoint=never rows, since torch.distributed.pipelining does no re-materialization."
            " torch_1f1b refuses M < K."
        ),
    ]
    return "\n".join(lines) + "\n"


def _data_parallel_table(rows: list[dict], ddp: dict) -> list[str]:
    """DDP on K processes beside this strategy on the same processes, each at its best M: one pipeline, D
    replicas of K/D stages, and the same with each stage's training state split over its replicas."""
    k = ddp["k"]

    def best(impl: str) -> dict | None:
        found = [r for r in rows if (r["impl"], r["k"], r["checkpoint"]) == (impl, k, "never")]
        return max(found, key=lambda r: r["samples_per_s"], default=None)

    lines = [
        f"Data parallelism on K={k} processes, each row at its best M: training state is the most one process held"
        " between steps (parameters, gradients, optimizer state).",
        "",
        "| row | M | samples/s | peak RSS MiB per process | training state per process |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, row in [
        ("ddp (the whole model, batch / K each)", ddp),
        (f"gpipe ({k} stages)", best("gpipe")),
        ("gpipe_dp ({d} replicas of {s} stages)", best("gpipe_dp")),
        ("gpipe_fsdp ({d} replicas of {s} stages, shard='full')", best("gpipe_fsdp")),
    ]:
        if row is not None:
            name = label.format(d=row.get("dp", 1), s=k // row.get("dp", 1))
            lines.append(
                f"| {name} | {row['m']} | {row['samples_per_s']:.0f} | {_mib(row['rss_max_bytes'])} |"
                f" {_fmt_bytes(row.get('state_max_bytes'))} |"
            )
    return [*lines, ""]


def _overview_table(rows: list[dict]) -> list[str]:
    """Samples per second of every implementation, bubble and activation memory, one line per (K, M)."""
    by = {(r["impl"], r["k"], r["m"], r["checkpoint"]): r for r in rows if r["impl"] not in ALONE}
    lines = []
    for single in sorted((r for r in rows if r["impl"] == "single"), key=lambda r: r.get("window", 1)):
        window = single.get("window", 1)
        raw = alone(rows, "single_raw", window)
        lines += [
            (
                f"single (plain Lightning, one process, {single['threads']} threads, in the K={window} group's"
                f" window): {single['samples_per_s']:.0f} samples/s, activations"
                f" {_mib(single['activation_bytes_max'])} MiB."
                + (
                    f" single_raw (a plain PyTorch loop, the same threads): {raw['samples_per_s']:.0f} samples/s;"
                    f" single / single_raw = {single['samples_per_s'] / raw['samples_per_s']:.2f} (round by round,"
                    f" the median: {paired(single, raw):.2f})."
                    if raw
                    else ""
                )
            ),
            "",
        ]
    for ddp in sorted((r for r in rows if r["impl"] == "ddp"), key=lambda r: r["k"]):
        lines += _data_parallel_table(rows, ddp)
    lines += [
        (
            "| K | M | micro-batch | samples/s: gpipe never | gpipe always | executor | torch_gpipe | torch_1f1b |"
            " bubble: gpipe never | theory | activation MiB (max stage): never | always |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, m in sorted({(r["k"], r["m"]) for r in rows if r["impl"] == "gpipe"}):

        def get(impl: str, field: str, mode: str = "never", k: int = k, m: int = m) -> float | None:
            row = by.get((impl, k, m, mode))
            return None if row is None else row[field]

        speeds = [("gpipe", "never"), ("gpipe", "always"), ("executor", "never"), ("torch_gpipe", "never")]
        lines.append(
            f"| {k} | {m} | {get('gpipe', 'microbatch_size')} |"
            + "".join(f" {_fmt(get(impl, 'samples_per_s', mode), '.0f')} |" for impl, mode in speeds)
            + f" {_fmt(get('torch_1f1b', 'samples_per_s'), '.0f')} | {_fmt(get('gpipe', 'bubble_measured'), '.3f')} |"
            f" {_fmt(get('gpipe', 'bubble_theory'), '.3f')} | {_mib(get('gpipe', 'activation_bytes_max'))} |"
            f" {_mib(get('gpipe', 'activation_bytes_max', 'always'))} |"
        )
    return lines + _one_f_one_b_table(by) + _interleaved_table(by)


def _one_f_one_b_table(by: dict) -> list[str]:
    """This strategy's 1F1B beside its F-then-B and PyTorch's 1F1B, checkpoint=never: speed, and each stage's
    peak of saved activations (1F1B holds at most K - j micro-batches on stage j, F-then-B all M)."""
    points = sorted((k, m) for impl, k, m, mode in by if impl == "gpipe_1f1b" and mode == "never")
    if not points:
        return []
    lines = [
        "",
        "| K | M | samples/s: gpipe | gpipe_1f1b | torch_1f1b | gpipe_1f1b / limit | activation KiB per stage:"
        " gpipe | gpipe_1f1b |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, m in points:
        mine, fthenb, torch_row = (by.get((impl, k, m, "never")) for impl in ("gpipe_1f1b", "gpipe", "torch_1f1b"))
        limit = mine["samples_per_s"] / mine["limit_samples_per_s"] if "limit_samples_per_s" in mine else None
        stages = [" ".join(f"{b / 1024:.0f}" for b in row["activation_bytes_stages"]) if row else "-" for row in (fthenb, mine)]
        lines.append(
            f"| {k} | {m} | {_fmt(fthenb and fthenb['samples_per_s'], '.0f')} | {mine['samples_per_s']:.0f} |"
            f" {_fmt(torch_row and torch_row['samples_per_s'], '.0f')} | {_fmt(limit, '.3f')} | {stages[0]} |"
            f" {stages[1]} |"
        )
    return lines


def _interleaved_table(by: dict) -> list[str]:
    """Interleaved 1F1B (v chunks per rank), this strategy's beside PyTorch's and F-then-B, checkpoint=never: speed,
    against its exact limit where known, and each stage's peak of saved activations."""
    points = sorted((k, m) for impl, k, m, mode in by if impl == "gpipe_interleaved" and mode == "never")
    if not points:
        return []
    lines = [
        "",
        f"Interleaved 1F1B, v={VIRTUAL_STAGES} chunks per rank:",
        "",
        "| K | M | samples/s: gpipe | gpipe_interleaved | torch_interleaved | gpipe_interleaved / limit |"
        " / gpipe | / torch_interleaved | activation KiB per stage: gpipe | gpipe_interleaved |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, m in points:
        mine, fthenb, peer = (by.get((impl, k, m, "never")) for impl in ("gpipe_interleaved", "gpipe", "torch_interleaved"))
        limit = mine["samples_per_s"] / mine["limit_samples_per_s"] if "limit_samples_per_s" in mine else None
        over = [mine["samples_per_s"] / row["samples_per_s"] if row else None for row in (fthenb, peer)]
        stages = [" ".join(f"{b / 1024:.0f}" for b in row["activation_bytes_stages"]) if row else "-" for row in (fthenb, mine)]
        lines.append(
            f"| {k} | {m} | {_fmt(fthenb and fthenb['samples_per_s'], '.0f')} | {mine['samples_per_s']:.0f} |"
            f" {_fmt(peer and peer['samples_per_s'], '.0f')} | {_fmt(limit, '.3f')} | {_fmt(over[0], '.3f')} |"
            f" {_fmt(over[1], '.3f')} | {stages[0]} | {stages[1]} |"
        )
    return lines


def _cpu_table(rows: list[dict]) -> list[str]:
    """Each process's CPU time per step beside the step's time: the work each implementation does, which a slow
    phase of the machine changes far less than the time it takes."""
    lines = [
        (
            "CPU time per timed step of each process (all its threads, gloo's included; the median over rounds of"
            " each round's median) beside the step's time (the fastest round's), checkpoint=never:"
        ),
        "",
        "| impl | K | M | step ms | CPU ms per step, rank 0, 1, ... |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["checkpoint"] == "never":
            cpu = ", ".join(f"{c * 1e3:.1f}" for c in r["cpu_step_s_ranks"])
            lines.append(f"| {r['impl']} | {k_cell(r)} | {r['m']} | {r['step_s'] * 1e3:.1f} | {cpu} |")
    return lines


def _goals_table(goals: dict[str, dict]) -> list[str]:
    lines = ["| goal | target | result | missed at (K, M, checkpoint) |", "|---|---|---|---|"]
    for name, goal in goals.items():
        result = _met(goal["met"]) + (f" (aim {'met' if goal['aim_met'] else 'missed'})" if "aim_met" in goal else "")
        missed = ", ".join("(" + ", ".join(str(v) for v in e.values()) + ")" for e in goal["missed_at"])
        lines.append(f"| {name} | {goal['target']} | {result} | {missed or '-'} |")
    return lines


def _rows_table(rows: list[dict]) -> list[str]:
    lines = [
        (
            "| impl | K | M | checkpoint | micro-batch | threads | samples/s | step ms per round |"
            " bubble measured | bubble theory | activation MiB (max stage) | peak RSS MiB (max process) |"
            " limit samples/s | / limit |"
        ),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rounds = ", ".join(f"{s * 1e3:.0f}" for s in r["step_s_rounds"])
        limit = r.get("limit_samples_per_s")
        lines.append(
            f"| {r['impl']} | {k_cell(r)} | {r['m']} | {r['checkpoint']} | {r['microbatch_size']} | {r['threads']} |"
            f" {r['samples_per_s']:.0f} | {rounds} | {_fmt(r['bubble_measured'], '.3f')} |"
            f" {r['bubble_theory']:.3f} | {_mib(r['activation_bytes_max'])} | {_mib(r['rss_max_bytes'])} |"
            f" {_fmt(limit, '.0f')} | {_fmt(None if limit is None else r['samples_per_s'] / limit, '.2f')} |"
        )
    return lines


def k_cell(row: dict) -> str:
    """The K column of the rows table: a row run alone names the group it was measured in."""
    return f"{row['k']} (K={row['window']} group)" if "window" in row else str(row["k"])


def _ratios_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        (
            "| K | M | gpipe / torch_gpipe | gpipe / torch_1f1b | gpipe / executor | the same, round by round |"
            " efficiency / theory: never, always | activation always / never | time always / never |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pick(name: str, k: int, m: int, field: str = "ratio", mode: str = "never") -> str:
        hits = [e[field] for e in summary[name] if (e["k"], e["m"], e.get("checkpoint", mode)) == (k, m, mode)]
        return _fmt(hits[0] if hits else None, ".2f")

    for k, m in sorted({(e["k"], e["m"]) for e in summary["efficiency_vs_theory"]}):
        efficiency = f"{pick('efficiency_vs_theory', k, m)}, {pick('efficiency_vs_theory', k, m, mode='always')}"
        lines.append(
            f"| {k} | {m} | {pick('gpipe_vs_torch_gpipe', k, m)} | {pick('gpipe_vs_torch_1f1b', k, m)} |"
            f" {pick('gpipe_vs_executor', k, m)} | {pick('gpipe_vs_executor', k, m, 'paired')} | {efficiency} |"
            f" {pick('checkpoint_always_vs_never', k, m, 'activation_ratio')} |"
            f" {pick('checkpoint_always_vs_never', k, m, 'time_ratio')} |"
        )
    return lines


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows if not r["impl"].startswith("single")})
    series = [
        ("gpipe", "never"),
        ("gpipe", "always"),
        ("executor", "never"),
        ("torch_gpipe", "never"),
        ("torch_1f1b", "never"),
    ]

    def line(impl: str, k: int, mode: str) -> list[dict]:
        return sorted(
            (r for r in rows if (r["impl"], r["k"], r["checkpoint"]) == (impl, k, mode)), key=lambda r: r["m"]
        )

    written = []
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for impl, mode in series:
            rs = line(impl, k, mode)
            if rs:
                ax.plot([r["m"] for r in rs], [r["samples_per_s"] for r in rs], "o-", label=f"{impl} {mode}")
        single = alone(rows, "single", k)
        if single:
            ax.axhline(single["samples_per_s"], color="black", linestyle=":", label="single (1 process)")
        ax.set(ylabel="samples / s", title=f"Throughput, K={k}")
        _m_axis(ax, rows)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "throughput_vs_m.png"))

    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for impl, mode in series[:3]:
            rs = line(impl, k, mode)
            ax.plot([r["m"] for r in rs], [r["bubble_measured"] for r in rs], "o-", label=f"{impl} {mode}")
        rs = line("gpipe", k, "never")
        ax.plot([r["m"] for r in rs], [r["bubble_theory"] for r in rs], "k--", label="theory (K-1)/(M+K-1)")
        ax.set(ylabel="bubble fraction", ylim=(0, 1), title=f"Bubble, K={k}")
        _m_axis(ax, rows)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "bubble_vs_m.png"))

    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for mode in ("never", "always"):
            rs = line("gpipe", k, mode)
            ax.plot([r["m"] for r in rs], [r["activation_bytes_max"] / 2**20 for r in rs], "o-", label=f"gpipe {mode}")
        ax.set(ylabel="activation MiB (largest stage)", ylim=(0, None), title=f"Activations, K={k}")
        _m_axis(ax, rows)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "activation_memory.png"))
    written.append(_efficiency_vs_k(rows, out / "efficiency_vs_k.png", plt))
    return written


def _efficiency_vs_k(rows: list[dict], path: Path, plt: Any) -> Path:
    """Pipeline efficiency (1 - bubble measured) of gpipe without re-materialization against K, one line per M,
    beside the theoretical M / (M+K-1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    never = [r for r in rows if r["impl"] == "gpipe" and r["checkpoint"] == "never"]
    for i, m in enumerate(sorted({r["m"] for r in never})):
        rs = sorted((r for r in never if r["m"] == m), key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        color = f"C{i}"
        ax.plot(ks, [1 - r["bubble_measured"] for r in rs], "o-", color=color, label=f"M={m} measured")
        ax.plot(ks, [theoretical_efficiency(k, m) for k in ks], "--", color=color, alpha=0.6, label=f"M={m} theory")
    ax.set(xlabel="stages K", ylabel="efficiency (1 - bubble)", ylim=(0, 1), title="Pipeline efficiency against K")
    ax.set_xscale("log", base=2)
    ks = sorted({r["k"] for r in never})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _m_axis(ax: Any, rows: list[dict]) -> None:
    ms = sorted({r["m"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlabel("micro-batches M")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(rows: list[dict], cfg: dict[str, Any], wall_s: float, out: Path) -> list[Path]:
    """Write benchmark.json, benchmark.md and the plots into ``out``; returns their paths."""
    for r in rows:  # data parallelism has no pipeline and no bubble
        k = r["k"] // r.get("dp", 1)  # a replica's stages; interleaved, each with v chunks: (K-1)/v to fill
        fill = 0.0 if r["impl"] == "ddp" else (k - 1) / (VIRTUAL_STAGES if r["impl"] in INTERLEAVED else 1)
        r["bubble_theory"] = fill / (r["m"] + fill)
    summary = summarize(rows, cfg["depth"])
    report = {"config": cfg, "machine": machine(), "wall_s": wall_s, "rows": rows, "summary": summary}
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (out / "benchmark.md").write_text(markdown(report))
    return [out / "benchmark.json", out / "benchmark.md", *plot(rows, out)]
