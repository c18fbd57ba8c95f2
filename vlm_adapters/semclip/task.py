"""Recipe task `semclip_scorer`: oracle labels from the frozen VLM, then psi's heads, in the training loop.

`vlm-adapters train RECIPE` (one process, or under torchrun / accelerate launch) runs both steps:

1. labelling (vlm_adapters.semclip.labels): every record's candidate crops are scored by the frozen
   VLM (the oracle) into OUTPUT/labels.jsonl, each process its share, line by line; a rerun goes on
   from what is there (`semclip label --out OUTPUT/labels.jsonl` fills it the same way);
2. training psi: InfoNCE over each question's candidate crops with the oracle crop as the positive,
   on the frozen CLIP features (computed once), through the same loop as adapter training
   (vlm_adapters.train.loop): checkpoints, --resume, --stop-after, progress, NaN and Ctrl-C handling.
   A checkpoint is an adapter directory holding the SemClip adapter: `load_adapters`, `infer`,
   `eval --adapters` and `semclip show --adapters` take it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..errors import AdapterError
from ..train.data import BadRecord
from ..train.loop import Trainer, processes, register_task
from .labels import Shard, label_dataset, label_examples, read_labels
from .train import FeatureCache, _logits, cache_features

LABELS = "labels.jsonl"
TEMPERATURE = 0.07  # as `semclip train`


@dataclass
class ScorerOutput(ModelOutput):
    loss: torch.Tensor | None = None


class ScorerObjective(nn.Module):
    """InfoNCE of the scorer's heads on rows of a FeatureCache: `objective(rows=...).loss`. Only the
    scorer is a submodule (what DDP wraps); the VLM is not."""

    def __init__(self, scorer: nn.Module, cache: FeatureCache, wrapped, temperature: float = TEMPERATURE):
        super().__init__()
        self.scorer, self.cache, self.temperature = scorer, cache, temperature
        self.__dict__["wrapped"] = wrapped  # not a submodule: never wrapped, moved or broadcast with psi

    def forward(self, rows: torch.Tensor) -> ScorerOutput:
        rows = rows.cpu()
        logits = _logits(self.scorer, self.cache, rows, self.temperature, self.scorer.image_head.weight.device)
        return ScorerOutput(loss=F.cross_entropy(logits.float(), self.cache.target[rows].to(logits.device)))


class RowCollator:
    """A batch of cache rows: {"rows": tensor, "ids": the labels' ids}."""

    def __init__(self, ids: list[str]):
        self.ids = ids

    def __call__(self, rows: list[int]) -> dict:
        return {"rows": torch.tensor(rows), "ids": [self.ids[i] for i in rows]}


class ScorerTrainer(Trainer):
    def _records(self):
        return None, []  # labelling reads and checks the records itself

    def examples(self, wrapped, records, bad):
        from accelerate.utils import DistributedType

        acc, data = self.accelerator, self.recipe.data
        scorer = wrapped.adapters["semclip"].config.scorer
        if scorer != "psi":
            raise AdapterError(f"task semclip_scorer trains psi's heads, but the recipe's SemClip has scorer={scorer!r}, "
                               "which has none to train (it needs no training): set scorer: psi, or run it as is")
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise AdapterError(f"task semclip_scorer runs on DDP, not {acc.distributed_type.value}: psi's heads are a "
                               "few MB and the VLM is only run, never trained. Launch without the FSDP/DeepSpeed "
                               "config (accelerate launch --multi_gpu, or torchrun)")
        if not hasattr(wrapped.base_model, "hf_device_map"):
            wrapped.to(acc.device)
        wrapped.eval()
        labels = self.out / LABELS
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        try:
            with _ctrl_c_stops():
                report = label_dataset(wrapped, data.json, data.image_root, labels, on_bad=data.on_bad_record,
                                       progress=self.main, shard=Shard.from_accelerate(acc.state),
                                       allow_outside_root=data.allow_outside_root,
                                       on_bad_record=lambda b: self.console.print(
                                           f"[yellow]skipped record {b.id}: {b.reason}", highlight=False))
        except KeyboardInterrupt:
            raise AdapterError(f"interrupted while labelling: the labels written so far are kept in {labels} (and "
                               f"its .shard-N files); run the same command again to continue") from None
        self.say(f"oracle labels: {report.written} written by process 0 ({processes(acc)}), "
                 f"{report.already_done} already in {labels}, which now holds {report.total}")
        scorer = wrapped.adapters["semclip"].scorer
        cache = cache_features(scorer, label_examples(read_labels(labels), data.image_root, data.allow_outside_root),
                               on_bad=data.on_bad_record, progress=self.main)
        bad = report.bad + [BadRecord(rid, why) for rid, why in cache.skipped]
        self.cache = cache
        return list(range(len(cache))), bad

    def dataset(self, records, processor, wrapped):
        return records, RowCollator(self.cache.ids), 0  # rows of in-memory features: no workers

    def objective(self, wrapped):
        return ScorerObjective(wrapped.adapters["semclip"].scorer, self.cache, wrapped)

    def adapted(self, prepared):
        return prepared.wrapped


@contextlib.contextmanager
def _ctrl_c_stops():
    """Ctrl-C stops labelling at once (every label is on disk as soon as it is made); the training loop's
    own handler, which waits for the end of an optimizer step, is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train_scorer_recipe(recipe, **options):
    """The trainer of task semclip_scorer (see the module's docstring)."""
    return ScorerTrainer(recipe, **options).run()


register_task("semclip_scorer", train_scorer_recipe)
