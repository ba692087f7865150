"""Runs pipeline scenarios on one rank; started K times by ``tests/launch.py`` or by Lightning's launcher.

Usage: python tests/_worker.py SCENARIOS.json OUT_DIR
Each scenario trains (or fails) with GPipeStrategy and saves what the tests compare in OUT_DIR.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import sys
import traceback
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

import _model  # noqa: E402
from p2p_order import recorded  # noqa: E402
import lightning as L  # noqa: E402
from _model import RecordingLogger, StepRecorder  # noqa: E402
from lightning.pytorch.callbacks import BatchSizeFinder, EMAWeightAveraging, ModelCheckpoint, ModelSummary  # noqa: E402

from lightning_gpipe import GPipeStrategy  # noqa: E402
from lightning_gpipe.instrument.memory import state_bytes  # noqa: E402
from lightning_gpipe.model.partition import stage_view  # noqa: E402


def trainer_for(scenario: dict, strategy, logger) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=scenario.get("k", 1),
        strategy=strategy,
        max_epochs=scenario.get("epochs", 2),
        gradient_clip_val=scenario.get("clip"),
        accumulate_grad_batches=scenario.get("accumulate", 1),
        precision=scenario.get("precision", "32-true"),
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**options, **scenario.get("trainer", {})})


def kill_self(kill: dict, trainer: L.Trainer, model: L.LightningModule) -> None:
    """SIGKILL this rank in training (``{"epoch", "batch"}``), in the n-th checkpoint save (``{"save"}``), or
    right after the n-th sharded save wrote its tensors (``{"after_tensors"}``); or send it SIGTERM as the n-th
    checkpoint's gather begins (``{"sigterm_save"}``)."""

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if "batch" in kill:
        original = model.training_step

        def step(batch, batch_idx):
            if trainer.current_epoch == kill["epoch"] and batch_idx == kill["batch"]:
                die()
            return original(batch, batch_idx)

        model.training_step = step
        return
    saves = [0]
    if "sigterm_save" in kill:  # SIGTERM to this rank as it starts gathering the n-th checkpoint
        original_gather = trainer.strategy.lightning_module_state_dict

        def gather():
            saves[0] += 1
            if saves[0] == kill["sigterm_save"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return original_gather()

        trainer.strategy.lightning_module_state_dict = gather
        return
    if "after_tensors" in kill:  # a sharded save dies once its tensors are written, before they are published
        import lightning_gpipe.checkpointing.sharded as sharded

        original_save = sharded.dcp.save

        def save(*args, **kwargs):
            result = original_save(*args, **kwargs)
            saves[0] += 1
            if saves[0] == kill["after_tensors"]:
                die()
            return result

        sharded.dcp = SimpleNamespace(save=save, load=sharded.dcp.load, FileSystemReader=sharded.dcp.FileSystemReader)
        return
    if kill["rank"] != 0:  # other stages die while sending their state to rank 0
        original_state = trainer.strategy.lightning_module_state_dict

        def state_dict():
            saves[0] += 1
            if saves[0] == kill["save"]:
                die()
            return original_state()

        trainer.strategy.lightning_module_state_dict = state_dict
        return
    # Rank 0 dies halfway through writing the file's bytes.
    from fsspec.implementations.local import LocalFileOpener

    original_write = LocalFileOpener.write

    def write(self, data):
        saves[0] += 1
        if saves[0] == kill["save"]:
            original_write(self, data[: len(data) // 2])
            self.flush()
            die()
        return original_write(self, data)

    LocalFileOpener.write = write


def _held(model: L.LightningModule) -> dict:
    """What this process's module holds: the whole model on global rank 0 after a run, one stage elsewhere."""
    with stage_view():  # the tests read the stages, which user code gets an error for
        return {k: v.clone() for k, v in model.state_dict().items()}


def _state_bytes(module: L.LightningModule, trainer: L.Trainer) -> int:
    """The training state this rank holds, with GPipeStrategy(shard=...) its share of the parameters too."""
    shards = getattr(getattr(trainer.strategy, "_run", None), "shards", None)
    return state_bytes(module, trainer.optimizers, shards.shard_parameters() if shards is not None else ())


def run(scenario: dict, out: Path) -> None:
    """Run ``scenario`` on this rank and save what it did, the order of its point-to-point messages included."""
    ops: list = []
    with recorded(ops):
        _run(scenario, out, ops)


def _run(scenario: dict, out: Path, ops: list) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    result: dict = {"p2p": ops}
    try:
        seed = scenario.get("seed", 0)
        if seed is not None:  # "rank": each rank its own seed, as processes whose random streams drifted apart
            seed = rank if seed == "rank" else seed
            L.seed_everything(seed, verbose=False, workers=scenario.get("seed_workers", False))
        models = importlib.import_module(scenario.get("model_module", "_model"))
        build = partial(getattr(models, scenario.get("model_class", "Classifier")), **scenario.get("model", {}))
        result["random_before_build"] = torch.get_rng_state()
        model = None if "init_module" in scenario else build()
        train, val = getattr(models, scenario.get("loaders", "loaders"))(**scenario.get("data", {}))
        strategy = "ddp" if scenario.get("ddp") else GPipeStrategy(**scenario.get("strategy", {}))
        logger = RecordingLogger()
        loggers = [logger]
        if scenario.get("tensorboard"):
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=out, name=scenario["name"], version=""))
            result["tensorboard"] = str(out / scenario["name"])
        trainer = trainer_for(scenario, strategy, loggers)
        if model is None:  # built as Lightning suggests for large models: under the strategy's init context
            result["random_before_build"] = torch.get_rng_state()
            with trainer.init_module(empty_init=scenario["init_module"]):
                model = build()
        fail_at = scenario.get("fail_at")
        if fail_at is not None and rank == fail_at["rank"]:
            original = model.training_step

            def failing(batch, batch_idx):
                if batch_idx == fail_at["batch"]:
                    raise RuntimeError(f"deliberate failure on rank {rank} at batch {batch_idx}")
                return original(batch, batch_idx)

            model.training_step = failing

        class RecordStage(L.Callback):
            def on_fit_start(self, trainer, pl_module):
                for callback in trainer.callbacks:  # the summary Lightning's callback is about to print
                    if isinstance(callback, ModelSummary) and callback._max_depth:
                        summary = callback._summary(trainer, pl_module)
                        result["summary"] = (summary.total_parameters, summary._get_summary_data())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                # The most this rank held right after an optimizer step (not within an accumulation window).
                if scenario.get("state_bytes") and trainer.global_step != result.get("stepped", 0):
                    result["stepped"] = trainer.global_step
                    held = _state_bytes(pl_module, trainer)
                    result["state_bytes"] = max(result.get("state_bytes", 0), held)

            def on_train_end(self, trainer, pl_module):
                result["stage_params"] = sorted(pl_module.state_dict())  # what this rank holds while training
                run = getattr(trainer.strategy, "_run", None)
                link = run.executor.link if run is not None else None
                result["headers"] = (link.headers_sent, link.headers_received) if link is not None else None

        steps = StepRecorder()
        trainer.callbacks += [RecordStage(), steps]
        if scenario.get("finetuning"):
            trainer.callbacks.append(_model.UnfreezeFirstLayer())
        if scenario.get("batch_size_finder"):  # as Tuner(trainer).scale_batch_size(model) adds it
            trainer.callbacks.append(BatchSizeFinder(max_trials=2))
        if scenario.get("averaging"):
            trainer.callbacks.append(EMAWeightAveraging())
        if "model_checkpoint" in scenario:  # save_last=True and a folder, for ckpt_path="last"
            trainer.callbacks.append(ModelCheckpoint(**scenario["model_checkpoint"]))
        kill = scenario.get("kill")
        if kill is not None and rank == kill["rank"]:
            kill_self(kill, trainer, model)
        resume = scenario.get("resume_from")
        if resume is not None and resume != "last" and not os.path.isabs(resume):
            resume = out / f"{resume}.ckpt"
        if scenario.get("validate_first"):
            trainer.validate(model, val, verbose=False)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed) if scenario.get("capture_stdout") else contextlib.nullcontext():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if "datamodule" in scenario:
                    trainer.fit(model, datamodule=getattr(_model, scenario["datamodule"])(), ckpt_path=resume)
                else:
                    trainer.fit(model, train, val, ckpt_path=resume)
        result["stdout"] = printed.getvalue()
        result["warnings"] = [str(w.message) for w in caught if str(w.message).startswith("GPipeStrategy")]
        result["batch_sums"] = steps.batch_sums
        result["outputs"] = {"train": steps.train, "val": steps.val}
        result["params"] = _held(model)
        result["module_types"] = [type(m).__name__ for m in model.modules()]
        with stage_view():
            result["parameter_count"] = len(list(model.parameters()))  # tied parameters count once
        result["logged"] = logger.records
        result["microbatches"] = getattr(trainer.strategy, "microbatches", None)
        advice = getattr(getattr(trainer.strategy, "_kept", None), "advice", None)
        result["advice"] = advice.table() if advice is not None else None
        result["callback_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if scenario.get("use_after_fit"):  # the module itself, as user code after fit uses it
            try:
                with torch.no_grad():
                    result["after_fit"] = torch.cat([model(x) for x, _ in val])
            except Exception as e:
                result["after_fit"] = f"{type(e).__name__}: {e}"
            try:
                result["state_dict_after_fit"] = sorted(model.state_dict())
            except Exception as e:
                result["state_dict_after_fit"] = f"{type(e).__name__}: {e}"
        if scenario.get("refit"):  # unfreeze everything and train one more epoch on the same Trainer
            for p in model.parameters():
                p.requires_grad_(True)
            trainer.fit_loop.max_epochs += 1
            trainer.fit(model, train, val)
            result["params"] = _held(model)
        if scenario.get("predict"):
            result["predictions"] = trainer.predict(model, val)
        if "fresh_strategy" in scenario:  # a new Trainer and strategy on the trained model
            fresh = trainer_for({**scenario, "trainer": {}}, GPipeStrategy(**scenario["fresh_strategy"]), False)
            result["fresh_predictions"] = fresh.predict(model, val)
        if scenario.get("save"):
            path = out / f"{scenario['name']}.ckpt"
            trainer.save_checkpoint(path)
            result["checkpoint"] = str(path)
    except Exception as e:  # the tests assert on the message; scenarios that must fail say so
        if not scenario.get("expect_error"):
            raise
        result["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    result["gloo_threads"] = _gloo_threads()
    torch.save(result, out / f"{scenario['name']}.rank{rank}.pt")


def _gloo_threads() -> int:
    """Threads of this process's gloo process groups (two each): a run that built groups and left them behind
    would add to them."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().strip() == "pt_gloo_runloop"
        except OSError:  # a thread that ended while they were listed (a data loader's, say)
            pass
    return count


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for scenario in scenarios:
        run(scenario, out)
    # Every rank done, then the default group closed while rank 0's store still serves it: left to the interpreter's
    # exit, a rank outliving rank 0 once aborted there ("terminate called without an active exception", CI).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
