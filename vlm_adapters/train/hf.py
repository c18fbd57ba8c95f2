"""Train the adapters from your own `transformers.Trainer` or `trl.SFTTrainer` script.

    from vlm_adapters.train.hf import AdapterTrainer, LlavaCollator
    trainer = AdapterTrainer(model=wrapped, args=TrainingArguments("out", max_steps=100),
                             train_dataset=records, data_collator=LlavaCollator(wrapped, image_root="images"))
    trainer.train()                       # or .train(resume_from_checkpoint=True)
    trainer.save_model("out/final")       # adapter_config.json + adapter_model.safetensors + README.md

A Trainer saves and restores `PreTrainedModel`s and peft models only: anything else it saves as one
state dict of everything (the frozen base included) and restores with load_state_dict. `AdaptersOnly`,
a mixin for any Trainer class, makes `save_model` and every checkpoint hold the trainable weights in
this library's format (the adapters, plus the projector / LoRA when they train: `save_trainable`),
loadable with `AdaptedModel.from_pretrained`, and resumes from them; the Trainer's own files beside
them (optimizer, scheduler, RNG and trainer state) are its own. The optimizer sees what requires grad:
the adapters (and projector / LoRA when asked), never the frozen base. `AdapterTrainer` and
`AdapterSFTTrainer` are the mixin on `Trainer` and on trl's `SFTTrainer` (`pip install
"vlm-adapters[trl]"`). `LlavaCollator` batches LLaVA-format records (`{"image", "conversations"}`)
with the project's collator (chat template, masked answer labels, the question for the guidance).
"""

from __future__ import annotations

from pathlib import Path

import transformers
from transformers import Trainer

from ..atomic import write_dir
from ..card import write_card
from ..errors import AdapterError
from ..io import read_config
from ..wrap import AdaptedModel
from .data import Collator, load_image, parse_record
from .model import restore_trainable, save_trainable


class LlavaCollator:
    """LLaVA-format records -> a batch for the wrapped model: `{"id"?, "image": path (relative to
    `image_root`), "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", ...}]}`."""

    def __init__(self, wrapped: AdaptedModel, image_root=".", max_length: int | None = None):
        if not isinstance(wrapped, AdaptedModel) or wrapped.processor is None:
            raise AdapterError("LlavaCollator(wrapped): give the wrapped model, wrapped with processor=... (its chat "
                               "template and image processing make the batches)")
        self.root = Path(image_root)
        self.collate = Collator(wrapped.processor, wrapped.shim.image_token_id, max_length,
                                with_images=wrapped.wants_images)

    def __call__(self, features: list[dict]) -> dict:
        records = [parse_record(f, str(f.get("id", i)) if isinstance(f, dict) else str(i), self.root)
                   for i, f in enumerate(features)]
        batch = self.collate([(r, load_image(r)) for r in records])
        batch.pop("ids")
        return batch


class AdaptersOnly:
    """Mixin for a `transformers.Trainer` subclass whose model is an AdaptedModel (see the module doc)."""

    def adapted_model(self) -> AdaptedModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, AdaptedModel):
            raise AdapterError(f"{type(self).__name__} trains a wrapped model (vlm_adapters.wrap(...)), got "
                               f"{type(model).__name__}: use transformers' own Trainer for that")
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapters in our format (and the card, with this run), never the base."""
        if not self.args.should_save:
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        wrapped, training = self.adapted_model(), self.training_record()

        def build(staging: Path) -> None:
            save_trainable(wrapped, staging)
            write_card(staging, read_config(staging), training=training)

        write_dir(directory, build)  # staged, then swapped in whole: a kill leaves the old one or nothing

    def training_record(self) -> dict:
        """What the model card says about the run that produced the adapters."""
        data = self.train_dataset
        args, state = self.args, self.state
        return {"trainer": f"{type(self).__name__} (transformers {transformers.__version__})",
                "records": len(data) if hasattr(data, "__len__") else None, "step": state.global_step,
                "max_steps": state.max_steps, "epoch": state.epoch, "batch_size": args.per_device_train_batch_size,
                "grad_accum": args.gradient_accumulation_steps, "lr": args.learning_rate,
                "processes": args.world_size}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        directory = Path(resume_from_checkpoint)
        read_config(directory)  # a clear error when it holds no adapters
        restore_trainable(self.adapted_model(), directory)

    def _load_best_model(self) -> None:
        restore_trainable(self.adapted_model(), Path(self.state.best_model_checkpoint))

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads the records' own keys (image, conversations)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator


class AdapterTrainer(AdaptersOnly, Trainer):
    """`transformers.Trainer` for a wrapped model: adapter-only checkpoints in our format."""


def __getattr__(name: str):
    """`AdapterSFTTrainer` on first use: trl is an optional extra."""
    if name != "AdapterSFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .hf_trl import AdapterSFTTrainer

    return AdapterSFTTrainer
