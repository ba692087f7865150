"""The CUDA path: ``python -m pytest -m gpu`` on a machine with one GPU or more (a few minutes).

Every test here is skipped, with the reason shown, where torch sees no CUDA device; the K=2 test needs two GPUs
(NCCL). The run writes ``outputs/gpu-report.md``: the device, and what each test measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_logs, assert_same_params, full_params, reference_run, scenario
from torch import nn

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import merge, split
from lightning_gpipe.engine.p2p import from_host

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason=f"no CUDA device (torch {torch.__version__} sees none)"),
]
MODES = ("always", "except_last", "never")
ROOT = Path(__file__).resolve().parents[1]
GPU = {"accelerator": "gpu"}


@pytest.fixture(scope="module")
def report():
    """Lines for ``outputs/gpu-report.md``, written when the module's tests end."""
    lines: list[str] = []
    yield lines
    props = torch.cuda.get_device_properties(0)
    head = [
        "# lightning-gpipe on CUDA",
        "",
        f"- device: {props.name} ({props.total_memory / 2**30:.0f} GiB), {GPUS} visible",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    out = ROOT / "outputs" / "gpu-report.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(head + lines) + "\n")


def _on_cpu(params: dict) -> dict:
    return {name: value.detach().cpu() for name, value in params.items()}


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run(trainer_kwargs=GPU)


@pytest.mark.parametrize("checkpoint", MODES)
def test_k1_microbatches_on_cuda_equal_single_device(checkpoint, reference, report, tmp_path):
    """K=1, four micro-batches on the GPU, each re-materialization mode: parameters and logged values equal plain
    single-GPU Lightning's (1e-5), with clipping, accumulation, momentum and a scheduler."""
    from _worker import run

    run(scenario("k1", 1, 4, checkpoint, trainer=GPU), tmp_path)
    got = torch.load(tmp_path / "k1.rank0.pt", weights_only=False)
    assert_same_params(_on_cpu(got["params"]), _on_cpu(reference["params"]))
    assert_same_logs(got["logged"], reference["logged"])
    report.append(f"- K=1, M=4, checkpoint={checkpoint}: parameters and logs equal single-GPU Lightning's (1e-5)")


def test_observed_steps_report_cuda_memory(report, tmp_path):
    """Observed steps on the GPU log ``memory/cuda_max_allocated_stage0`` (the allocator's peak in the step) beside
    the activation meter's peak, which it must exceed (it counts parameters and gradients too)."""
    from _worker import run

    observed = scenario("observed", 1, 4, "never", trainer={**GPU, "max_steps": 3})
    run({**observed, "strategy": {**observed["strategy"], "observe_every_n_steps": 1}}, tmp_path)
    logged = [metrics for _, metrics in torch.load(tmp_path / "observed.rank0.pt", weights_only=False)["logged"]]
    peaks = [m["memory/cuda_max_allocated_stage0"] for m in logged if "memory/cuda_max_allocated_stage0" in m]
    activations = [m["memory/activation_bytes_peak_stage0"] for m in logged if "memory/cuda_max_allocated_stage0" in m]
    assert peaks and all(peak > meter > 0 for peak, meter in zip(peaks, activations)), (peaks, activations)
    report.append(f"- observed steps: CUDA peak {peaks[-1] / 2**10:.0f} KiB, activation meter {activations[-1] / 2**10:.0f} KiB")


def test_bf16_mixed_on_cuda(report, tmp_path):
    """``bf16-mixed`` on the GPU: the recompute replays autocast (always and never agree exactly), and training
    follows single-GPU bf16 Lightning to bf16's rounding per micro-batch."""
    from _worker import run

    for mode in ("always", "never"):
        run(scenario(f"bf16_{mode}", 1, 4, mode, precision="bf16-mixed", trainer=GPU), tmp_path)
    always, never = (_on_cpu(torch.load(tmp_path / f"bf16_{m}.rank0.pt", weights_only=False)["params"]) for m in ("always", "never"))
    assert_same_params(always, never, atol=0)
    expected = _on_cpu(reference_run(precision="bf16-mixed", trainer_kwargs=GPU)["params"])
    assert_same_params(always, expected, atol=2e-2)
    worst = max((always[n] - expected[n]).abs().max().item() for n in expected)
    report.append(f"- bf16-mixed, K=1, M=4: recompute exact; largest difference from single-GPU bf16 {worst:.1e}")


def _blocks(width: int, depth: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.ReLU())]


def _step(executor: StageExecutor, x: torch.Tensor, m: int) -> None:
    micro = split(x, m)
    outputs = executor.forward(micro, len(micro), train=True)
    merge(outputs).pow(2).mean().backward()
    executor.backward()


def test_memory_meter_against_cuda_allocator(report):
    """The activation meter counts what the CUDA allocator holds for the backward: after the forwards of four
    micro-batches (``checkpoint="never"``), the meter's bytes equal the growth of ``memory_allocated`` within 2%,
    and the growth of ``max_memory_allocated`` exceeds the meter's peak by at most 10% (a Linear's output before its
    ReLU, one at a time)."""
    device = torch.device("cuda", 0)
    layers = [layer.to(device) for layer in _blocks(1024, 8)]
    executor = StageExecutor(layers, 0, 1, device, None, "never")
    x = torch.randn(512, 1024, device=device)
    _step(executor, x, 4)  # warm-up: cuBLAS's workspace and the allocator's pools
    for p in executor.parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    executor.meter.start(executor.parameters())
    micro = split(x, 4)
    outputs = executor.forward(micro, 4, train=True)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before
    peak = torch.cuda.max_memory_allocated(device) - before
    # The meter counts the micro-batches themselves too (the first Linear saves them), allocated before `before`.
    counted, counted_peak = executor.meter.current - x.nbytes, executor.meter.peak - x.nbytes
    assert abs(held - counted) <= 0.02 * counted, (held, counted)
    assert counted_peak <= peak <= 1.10 * counted_peak, (peak, counted_peak)
    merge(outputs).pow(2).mean().backward()
    executor.backward()
    executor.meter.stop()
    report.append(
        f"- activation meter, 8 x Linear(1024)+ReLU, batch 512, M=4: meter {executor.meter.peak / 2**20:.1f} MiB,"
        f" allocator held {held / 2**20:.1f} MiB, allocator peak {peak / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize("checkpoint", MODES)
def test_a_stage_step_makes_no_host_sync(checkpoint, report):
    """A training step's forwards, recomputes and backwards on one stage make no host sync: under
    ``torch.cuda.set_sync_debug_mode("error")`` any operation that waits for the device raises."""
    device = torch.device("cuda", 0)
    layers = [layer.to(device) for layer in _blocks(256, 4)] + [nn.Dropout(0.1)]
    executor = StageExecutor(layers, 0, 1, device, None, checkpoint)
    x = torch.randn(64, 256, device=device)
    _step(executor, x, 4)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(executor, x, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report.append(f"- one stage's step, checkpoint={checkpoint}: no host sync")


def test_host_tensors_reach_the_gpu_through_pinned_memory(report):
    """Headers and pickled messages go to the GPU from pinned memory without waiting for it."""
    device = torch.device("cuda", 0)
    header = torch.arange(64, dtype=torch.int64)
    torch.cuda.set_sync_debug_mode("error")  # a copy from pageable memory would wait
    try:
        moved = from_host(header, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.device == device and torch.equal(moved.cpu(), header)
    report.append("- headers to the GPU through pinned memory: no host sync, contents intact")


@pytest.mark.skipif(GPUS < 2, reason=f"K=2 over NCCL needs two GPUs; {GPUS} visible")
def test_k2_over_nccl_equals_single_device(reference, report, tmp_path):
    """Two stages on two GPUs over NCCL (which matches messages by order): parameters and logs equal single-GPU
    Lightning's (1e-5) for each re-materialization mode and under 1F1B."""
    from conftest import run_scenarios

    scenarios = [scenario(f"k2_{mode}", 2, 4, mode, trainer=GPU) for mode in MODES]
    scenarios.append({**scenario("k2_1f1b", 2, 4, model_class="MeanLossClassifier", trainer=GPU),
                      "strategy": {"microbatches": 4, "schedule": "1f1b"}})  # fmt: skip
    ranks = run_scenarios(2, scenarios, tmp_path)
    for mode in MODES:
        assert_same_params(_on_cpu(full_params(ranks[f"k2_{mode}"])), _on_cpu(reference["params"]))
        assert_same_logs(ranks[f"k2_{mode}"][0]["logged"], reference["logged"])
    mean = reference_run(model_class="MeanLossClassifier", trainer_kwargs=GPU)
    assert_same_params(_on_cpu(full_params(ranks["k2_1f1b"])), _on_cpu(mean["params"]))
    assert_same_logs(ranks["k2_1f1b"][0]["logged"], mean["logged"])
    report.append(f"- K=2 over NCCL, M=4, checkpoint in {MODES} and 1F1B: equal to single-GPU Lightning (1e-5)")


def test_benchmark_on_cuda(report, tmp_path):
    """``experiments/benchmark.py --device cuda --quick`` runs to the end and writes its rows."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "experiments/benchmark.py", "--device", "cuda", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["rows"], "no rows"
    report.append(f"- benchmark --device cuda --quick: {len(results['rows'])} rows in {time.monotonic() - start:.0f} s")
    report.extend(["", (tmp_path / "benchmark.md").read_text()])
