"""The training loop on `accelerate`: one code path for one process, DDP, FSDP and DeepSpeed.

Only the adapters (plus the projector / LoRA when the recipe says so) are given to the optimizer;
the base is frozen and gets neither gradients nor optimizer state. Every `output.save_every`
optimizer steps (and at the end) an adapter-only checkpoint is committed atomically. `resume`
restores weights, optimizer, scheduler, RNG states, the accumulation counter and the data position,
so a resumed run is bit-identical to one that never stopped. A NaN/inf loss or gradient stops the
run without writing a checkpoint (the last good one stays); the first Ctrl-C finishes the current
optimizer step, saves and stops (a second one aborts at once). Another recipe task subclasses
Trainer and changes what it trains on (`examples`, `dataset`) and what it minimises (`objective`):
vlm_adapters.semclip.task, SemClip's scorer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader

from .. import io
from ..card import write_card
from ..errors import AdapterError, shorten
from ..provenance import base_record, provenance
from ..version import __version__
from . import checkpoint as ckpt
from .data import BadRecord, Collator, ConversationDataset, EpochSampler, read_records
from .model import (
    build_trainable,
    load_base,
    model_dtype,
    restore_trainable,
    save_trainable,
    trainable_parameters,
)
from .optim import build_optimizer, build_scheduler
from .recipe import Recipe
from .run_dir import RunLock, check_output_dir, check_same_run

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# train.* settings a --resume may change: applied from the resumed step on (the rest must match)
RESUMABLE_CHANGES = ("lr", "weight_decay", "betas", "eps", "momentum", "schedule", "warmup_ratio", "max_grad_norm",
                     "max_steps", "epochs")
TASKS: dict[str, Callable] = {}


DISTRIBUTED = {"MULTI_CPU": "DDP on CPUs", "MULTI_GPU": "DDP", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


def processes(acc) -> str:
    """'1 process', or '2 processes (DDP)': how the run is spread, in words."""
    if acc.num_processes == 1:
        return "1 process"
    kind = acc.distributed_type.value
    return f"{acc.num_processes} processes ({DISTRIBUTED.get(kind, kind)})"


def register_task(name: str, fn: Callable) -> None:
    """Plug in the trainer of another recipe task (e.g. "semclip_scorer"): fn(recipe, **options)."""
    TASKS[name] = fn


class NonFiniteLoss(AdapterError):
    """The loss or the gradients became NaN/inf; no checkpoint was written for that step."""


class TrainingInterrupted(Exception):
    """Ctrl-C: the run saved a checkpoint (`checkpoint`) and stopped."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


@dataclass
class TrainResult:
    model: torch.nn.Module  # the AdaptedModel, trained
    step: int
    total_steps: int
    checkpoint: Path | None
    status: str  # "completed" or "paused" (--stop-after)
    losses: list[float] = field(default_factory=list)  # one per optimizer step, averaged over processes
    bad_records: list[BadRecord] = field(default_factory=list)


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch consumed by those steps


def train(recipe: Recipe, *, resume: bool = False, stop_after: int | None = None, cpu: bool = False,
          console: Console | None = None) -> TrainResult:
    """Train `recipe` (validated). resume: continue from output.dir's latest checkpoint;
    stop_after: save and stop after this many optimizer steps; cpu: force the CPU (DDP over gloo
    under torchrun)."""
    if recipe.task != "adapters":
        if recipe.task not in TASKS:
            raise AdapterError(f"task {shorten(recipe.task)} has no trainer in this installation (a method registers "
                               "it with vlm_adapters.train.register_task); train adapters with task: adapters")
        return TASKS[recipe.task](recipe, resume=resume, stop_after=stop_after, cpu=cpu, console=console)
    return Trainer(recipe, resume=resume, stop_after=stop_after, cpu=cpu, console=console).run()


class Trainer:
    def __init__(self, recipe: Recipe, *, resume: bool, stop_after: int | None, cpu: bool, console):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.recipe, self.resume, self.stop_after = recipe, resume, stop_after
        self.out = Path(recipe.output.dir)
        try:
            self.accelerator = Accelerator(
                mixed_precision=MIXED_PRECISION[recipe.train.precision], cpu=cpu,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.train.find_unused_parameters)])
        except ImportError as err:  # e.g. a DeepSpeed config without deepspeed installed
            raise AdapterError(f"{err} (the accelerate config asks for it; DeepSpeed also needs CUDA GPUs)") from None
        self.main = self.accelerator.is_main_process
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._interrupted = False
        self._last_saved: Path | None = None

    def say(self, message: str) -> None:
        if self.main:
            self.console.print(message, highlight=False)

    # -- setup -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from accelerate.state import AcceleratorState, GradientState

        check_output_dir(self.out)  # before the model loads, on every process
        previous = self._install_sigint()
        try:
            with RunLock(self.out) if self.main else contextlib.nullcontext():  # one run per directory
                return self._run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.accelerator.free_memory()
            # accelerate keeps process-wide state; drop ours so a later run in this process starts clean
            GradientState._reset_state()
            AcceleratorState._reset_state()

    def _run(self) -> TrainResult:
        from accelerate.utils import set_seed

        acc, recipe, t = self.accelerator, self.recipe, self.recipe.train
        existing = ckpt.latest_checkpoint(self.out)
        if existing is not None and not self.resume:
            raise AdapterError(f"{self.out} already has checkpoints (latest {existing.name}): pass --resume to "
                               "continue, or choose another directory with --set output.dir=...")
        if self.resume and existing is None:
            self.say(f"[yellow]no checkpoint in {self.out}: starting from scratch")
        if self.resume and existing is not None:
            existing = self._intact_checkpoint(existing)
            saved = ckpt.read_state(existing).get("recipe")
            check_same_run(existing, saved, recipe.to_dict())  # before the model loads: another run's dir
        elif self.main:
            self._trim_log(0)  # a run that starts afresh: a log left by one that never checkpointed is redone
        accum = recipe.grad_accum_for(acc.num_processes)
        acc.gradient_accumulation_steps = accum
        set_seed(t.seed)

        self._check_backend()
        records, bad = self._records()
        model, processor = load_base(recipe.model.name_or_path, model_dtype(recipe), recipe.model.revision,
                                     options=recipe.model.load_options())
        wrapped = build_trainable(model, processor, recipe)
        if existing is not None and self.resume:
            restore_trainable(wrapped, existing)
        elif recipe.model.init_from:
            restore_trainable(wrapped, ckpt.resolve_adapter_dir(recipe.model.init_from))
        records, bad = self.examples(wrapped, records, bad)
        optimizer, self.names = build_optimizer(trainable_parameters(wrapped), t)
        dataset, collate, workers = self.dataset(records, processor, wrapped)
        loader = DataLoader(dataset, batch_size=t.batch_size, sampler=EpochSampler(len(records), t.seed),
                            num_workers=workers, collate_fn=collate, generator=torch.Generator().manual_seed(t.seed))
        self.model, self.optimizer, self.loader = acc.prepare(self.objective(wrapped), optimizer, loader)
        self.unwrapped = self.adapted(acc.unwrap_model(self.model))
        self.total = t.max_steps or t.epochs * math.ceil(len(self.loader) / accum)
        self.scheduler = build_scheduler(self.optimizer, t, self.total)
        pos = self._load_state(existing) if existing is not None and self.resume else Position()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.write_json(self.out / "bad_records.json", [vars(b) for b in bad])
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        trainable = sum(p.numel() for _, p in trainable_parameters(self.unwrapped))
        self.say(f"training {trainable:,} parameters ({', '.join(sorted({n.split('.')[0] for n in self.names}))}) "
                 f"of {type(model).__name__}; {len(records)} records, {processes(acc)}, "
                 f"batch {t.batch_size} x accumulation {accum} x {acc.num_processes}, {self.total} steps")
        losses, status = self._loop(pos)
        return TrainResult(self.unwrapped, pos.step, self.total, self._last_saved, status, losses, bad)

    # -- what a task changes (task "adapters": the conversations through the wrapped VLM) -----------
    def examples(self, wrapped, records: list, bad: list) -> tuple[list, list]:
        """The training examples (after the model is built) and the bad records to report."""
        return records, bad

    def dataset(self, records: list, processor, wrapped):
        """(Dataset, collate_fn, DataLoader workers) over the examples; a batch is a dict with "ids"."""
        collate = Collator(processor, wrapped.shim.image_token_id, self.recipe.data.max_length,
                           with_images=wrapped.wants_images)
        return ConversationDataset(records, self.recipe.data.check_images), collate, self.recipe.data.num_workers

    def objective(self, wrapped) -> torch.nn.Module:
        """The module accelerate prepares: `module(**batch).loss` is what trains."""
        return wrapped

    def adapted(self, prepared: torch.nn.Module):
        """The AdaptedModel inside the unwrapped prepared module (what checkpoints save)."""
        return prepared

    def _check_backend(self) -> None:
        """FSDP or DeepSpeed asked for but not given: accelerate runs them on GPUs only, and would train
        as DDP (or one process) without a word."""
        got = self.accelerator.distributed_type.value
        for name, var, kind in (("FSDP", "ACCELERATE_USE_FSDP", "FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED",
                                                                         "DEEPSPEED")):
            if os.environ.get(var, "").lower() == "true" and got != kind:
                raise AdapterError(
                    f"{name} was asked for ({var}=true) but accelerate set this run up as {got}: accelerate turns "
                    f"{name} on only for GPU processes (it is ignored with --cpu or without CUDA). Run on GPUs, or "
                    "launch without the FSDP/DeepSpeed config for DDP over gloo on CPUs")

    def _intact_checkpoint(self, newest: Path) -> Path:
        """The newest complete checkpoint; damaged newer ones are named and set aside."""
        intact = ckpt.latest_intact(self.out, warn=lambda m: self.say(f"[yellow]{m}"))
        if intact is None:
            raise AdapterError(f"no usable checkpoint in {self.out / ckpt.CHECKPOINTS} (the newest, {newest.name}, "
                               f"is damaged: {ckpt.damage(newest)}): move the directory away and start again")
        self.accelerator.wait_for_everyone()
        if intact != newest and self.main:
            ckpt.set_aside_newer(self.out, intact)
            self.say(f"[yellow]resuming from {intact.name}, the newest intact checkpoint")
        self.accelerator.wait_for_everyone()
        return intact

    def _records(self):
        data = self.recipe.data
        with Progress(TextColumn("checking records"), BarColumn(), MofNCompleteColumn(), console=self.console,
                      transient=True, disable=not self.main) as progress:
            task = progress.add_task("records", total=None)
            good, bad = read_records(data.json, data.image_root, check_images=data.check_images,
                                     allow_outside_root=data.allow_outside_root,
                                     progress=lambda i, n: progress.update(task, completed=i, total=n))
        if bad:
            listing = "; ".join(f"{b.id}: {b.reason}" for b in bad[:20]) + (" ..." if len(bad) > 20 else "")
            if data.on_bad_record == "error":
                raise AdapterError(f"{len(bad)} bad record(s) in {data.json}: {listing}. Fix them, or set "
                                   "data.on_bad_record=skip to skip them")
            self.say(f"[yellow]skipped {len(bad)} bad record(s) (all in {self.out / 'bad_records.json'}): {listing}")
        if not good:
            raise AdapterError(f"no usable records in {data.json} ({len(bad)} bad)")
        return good, bad

    def _load_state(self, directory: Path) -> Position:
        acc = self.accelerator
        state = ckpt.read_state(directory)
        now = {"num_processes": acc.num_processes, "batch_size": self.recipe.train.batch_size,
               "grad_accum": acc.gradient_accumulation_steps, "seed": self.recipe.train.seed}
        differs = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if differs:
            changed = ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in differs.items())
            raise AdapterError(f"cannot resume {directory} exactly: {changed}; resume with the settings of the "
                               "run that wrote it")
        rank = ckpt.read_rank_state(directory, acc.process_index)
        if rank["params"] != self.names:
            raise AdapterError(f"{directory} was written for other trainable parameters: resume with the same "
                               "adapters and trainable settings")
        spec = type(self.recipe.train)
        fields = {f.name for f in dataclasses.fields(spec)}
        before = spec(**{k: v for k, v in state.get("recipe", {}).get("train", {}).items() if k in fields})
        changed = {k: (getattr(before, k), getattr(self.recipe.train, k)) for k in RESUMABLE_CHANGES
                   if getattr(before, k) != getattr(self.recipe.train, k)}
        if before.optimizer != self.recipe.train.optimizer:
            raise AdapterError(f"cannot resume {directory} with train.optimizer={shorten(self.recipe.train.optimizer)}: "
                               f"it was written by {shorten(before.optimizer)}, whose state does not carry over; resume "
                               "with the same optimizer, or start a new run (--set model.init_from=...)")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(rank["optimizer"])
        ckpt.reshard_optimizer_state(self.optimizer)  # FSDP2: each process saved its own shard
        self.scheduler.load_state_dict(state["scheduler"])
        if changed:
            self._apply_changes(changed, fresh)
        if acc.scaler is not None and rank.get("scaler"):
            acc.scaler.load_state_dict(rank["scaler"])
        ckpt.set_rng_state(rank["rng"])
        acc.step = state["accelerator_step"]
        self._last_saved = directory
        self.say(f"resuming from {directory} (step {state['step']}, epoch {state['epoch']})")
        self._trim_log(state["step"])
        return Position(state["step"], state["epoch"], state["batch"])

    def _apply_changes(self, changed: dict, fresh: list[dict]) -> None:
        """Honour optimisation settings changed on --resume (the restored state carries the old ones)."""
        groups = self.optimizer.param_groups
        for group, new in zip(groups, fresh):
            for key in ("weight_decay", "betas", "eps", "momentum"):
                if key in new:
                    group[key] = new[key]
        if "lr" in changed:
            lr, sched = self.recipe.train.lr, self.scheduler
            sched.base_lrs = [lr] * len(groups)
            for group, factor in zip(groups, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in groups]
        listing = ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in changed.items())
        self.say(f"[yellow]resuming with changed settings: {listing} (applied from here on)")

    def _trim_log(self, step: int) -> None:
        """Drop log.jsonl entries after the resumed checkpoint's step: they are about to be redone."""
        log = self.out / "log.jsonl"
        if not self.main or not log.is_file():
            return
        kept = []
        for line in log.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except (ValueError, AttributeError, TypeError, RecursionError):
                continue  # a line cut short by a kill, or not one of ours
            kept.append(line + "\n")
        ckpt.atomic_write_text(log, "".join(kept))

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self, pos: Position) -> tuple[list[float], str]:
        acc, recipe = self.accelerator, self.recipe
        out, t = recipe.output, recipe.train
        params = [p for _, p in trainable_parameters(self.unwrapped)]
        self.model.train()
        self.unwrapped.text_encoders.eval()
        losses, window, status, start_step = [], [], "completed", pos.step
        samples, clock = 0, time.perf_counter()
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                   TextColumn("{task.fields[speed]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, disable=not self.main) as progress:
            bar = progress.add_task("train", total=self.total, completed=pos.step, loss="-", lr="-", speed="-")
            while pos.step < self.total:
                self.loader.set_epoch(pos.epoch)  # accelerate passes it on to the sampler (and skip loaders)
                batches = acc.skip_first_batches(self.loader, pos.batch) if pos.batch else self.loader
                micro = 0
                for batch in batches:
                    ids = batch.pop("ids")
                    with acc.accumulate(self.model):
                        loss = self.model(**batch).loss
                        every = acc.gather(loss.detach().float().reshape(1))
                        if not torch.isfinite(every).all():
                            self._non_finite(f"the loss is {every.tolist()}", pos, ids)
                        acc.backward(loss)
                        if acc.sync_gradients and t.max_grad_norm:
                            norm = acc.clip_grad_norm_(params, t.max_grad_norm)
                            if t.precision != "fp16" and not torch.isfinite(torch.as_tensor(norm)).all():
                                self._non_finite(f"the gradient norm is {float(norm)}", pos, ids)
                        elif acc.sync_gradients and t.precision != "fp16" and not self._finite(
                                [p.grad for p in params if p.grad is not None]):
                            self._non_finite("a gradient holds NaN/inf", pos, ids)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        if acc.sync_gradients and not self._finite(params):
                            self._non_finite("the updated weights hold NaN/inf (is train.lr too high?)", pos, ids)
                    micro += 1
                    window.append(every.mean().item())
                    samples += len(ids) * acc.num_processes
                    if not acc.sync_gradients:
                        continue
                    if not acc.optimizer_step_was_skipped:
                        self.scheduler.step()
                    pos.step, pos.batch = pos.step + 1, pos.batch + micro
                    micro = 0
                    losses.append(sum(window) / len(window))
                    window = []
                    lr = self.scheduler.get_last_lr()[0]
                    speed = samples / max(time.perf_counter() - clock, 1e-9)
                    progress.update(bar, completed=pos.step, loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}",
                                    speed=f"{speed:.1f}")
                    if pos.step % out.log_every == 0 or pos.step == self.total:
                        self._log(progress, pos, losses[-1], lr, speed)
                        samples, clock = 0, time.perf_counter()
                    paused = self.stop_after is not None and pos.step - start_step >= self.stop_after
                    if self._interrupted:
                        acc.set_trigger()
                    interrupted = acc.check_trigger()
                    if pos.step % out.save_every == 0 or pos.step == self.total or paused or interrupted:
                        self._save(pos, losses[-1])
                    if interrupted:
                        raise TrainingInterrupted(self._last_saved, pos.step)
                    if paused and pos.step < self.total:
                        status = "paused"
                        self.say(f"stopped after {self.stop_after} steps as asked (--stop-after); saved "
                                 f"{self._last_saved}; continue with --resume")
                        return losses, status
                    if pos.step >= self.total:
                        break
                else:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
        self.say(f"[green]done[/]: {pos.step} steps, last loss {losses[-1] if losses else float('nan'):.4f}; "
                 f"adapters in {self._last_saved}")
        return losses, status

    def _finite(self, tensors: list) -> bool:
        """Whether every tensor on every process is finite (sharded weights are checked shard by shard)."""
        local = all(bool(torch.isfinite(x).all()) for x in tensors)
        return bool(self.accelerator.gather(torch.tensor([local], device=self.accelerator.device)).all())

    def _non_finite(self, what: str, pos: Position, ids) -> None:
        """Stop every process (they all get here: the loss and the norm are shared) with one message."""
        from accelerate.utils import gather_object

        last, ids = self._last_saved or "none yet", gather_object(list(ids))
        raise NonFiniteLoss(
            f"{what} at step {pos.step + 1} (epoch {pos.epoch}, records {ids}): training stopped and no "
            f"checkpoint was written for it; the last good checkpoint is {last}. Lower train.lr, check those "
            "records, or prefer train.precision=bf16 to fp16, then continue with --resume")

    def _log(self, progress: Progress, pos: Position, loss: float, lr: float, speed: float) -> None:
        if not self.main:
            return
        progress.console.print(f"step {pos.step}/{self.total}  epoch {pos.epoch}  loss {loss:.4f}  lr {lr:.3e}  "
                               f"{speed:.1f} samples/s", highlight=False)
        line = json.dumps({"step": pos.step, "epoch": pos.epoch, "loss": loss, "lr": lr, "samples_per_s": speed,
                           "time": time.time()})
        with open(self.out / "log.jsonl", "a") as f:
            f.write(line + "\n")

    def _save(self, pos: Position, loss: float) -> None:
        """Write the checkpoint of `pos` into a staging directory (every process its own share),
        then commit it by renaming (main process)."""
        staging = ckpt.staging_dir(self.out, pos.step)
        try:
            self._write_checkpoint(pos, loss, staging)
        except OSError as err:  # disk full, quota, permissions: nothing half-written is left
            if self.main:
                shutil.rmtree(staging, ignore_errors=True)
            raise AdapterError(
                f"could not write the checkpoint of step {pos.step} ({err.strerror or err}): no partial checkpoint "
                f"is left, the last one ({self._last_saved or 'none yet'}) is kept. Free space in {self.out} "
                "(output.keep_last N needs room for N+1 checkpoints while the newest is written), then "
                "continue with --resume") from None
        self._last_saved = self.out / ckpt.CHECKPOINTS / f"step-{pos.step:08d}"

    def _write_checkpoint(self, pos: Position, loss: float, staging: Path) -> None:
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if self.main:
            ckpt.begin(self.out, pos.step)
        acc.wait_for_everyone()
        adapter_state = None
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # gather the shards
            full = acc.get_state_dict(self.model)  # a collective; the full tensors land on the main process
            if self.main:
                adapter_state = {k: full[f"adapters.{k}"] for k in io.adapter_state(self.unwrapped)}
        named = trainable_parameters(self.unwrapped)
        if self.main:
            save_trainable(self.unwrapped, staging, adapter_state)
            ckpt.write_json(staging / ckpt.STATE_FILE, {
                "step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "accelerator_step": acc.step,
                "total_steps": self.total, "loss": loss, "num_processes": acc.num_processes,
                "batch_size": self.recipe.train.batch_size, "grad_accum": acc.gradient_accumulation_steps,
                "seed": self.recipe.train.seed, "scheduler": self.scheduler.state_dict(),
                "library_version": __version__, "recipe": self.recipe.to_dict(), "time": time.time(),
                "provenance": provenance(base=base_record(self.unwrapped.base_model))})  # settings: the recipe
            write_card(staging, io.read_config(staging), training={  # the card, now with its training run
                "trainer": "vlm-adapters train", "description": self.recipe.description or None,
                "data": str(self.recipe.data.json), "records": len(self.loader.dataset), "step": pos.step,
                "total_steps": self.total, "epoch": pos.epoch, "loss": round(float(loss), 6),
                "batch_size": self.recipe.train.batch_size, "grad_accum": acc.gradient_accumulation_steps,
                "processes": acc.num_processes, "lr": self.recipe.train.lr})
        ckpt.write_rank_state(staging, acc.process_index, {
            "params": self.names, "optimizer": self.optimizer.state_dict(), "rng": ckpt.rng_state(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "trainable_sha256": ckpt.weights_digest(named)})
        acc.wait_for_everyone()
        if self.main:
            ckpt.commit(self.out, pos.step, self.recipe.output.keep_last)
        acc.wait_for_everyone()

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C aborts at once
            self.say("[yellow]Ctrl-C: finishing this optimizer step, then saving a checkpoint "
                     "(Ctrl-C again to abort without saving)")

        previous = signal.signal(signal.SIGINT, handler)
        return previous
