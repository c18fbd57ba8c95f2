"""`AdapterSFTTrainer`: trl's `SFTTrainer` for a wrapped model (vlm_adapters.train.hf; trl is an extra).

SFTTrainer patches its model's forward with a fused LM head (per-token log-probabilities without the
full logits) that calls `model.base_model`'s backbone itself. On a wrapped model that call would go
around the wrapper, so the adapters' guidance would never be set up: here the patch goes on the
wrapped HF model instead, which the wrapper calls inside its guidance, and is removed again when the
trainer is done with it (`release_fused_head`), so `unwrap()` gives back the base as it was.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head
except ImportError as err:  # the optional extra
    from ..errors import AdapterError

    raise AdapterError(f"AdapterSFTTrainer needs trl ({err}): pip install 'vlm-adapters[trl]'") from None

from .hf import AdaptersOnly


class AdapterSFTTrainer(AdaptersOnly, SFTTrainer):
    """`trl.SFTTrainer` for a wrapped model: adapter-only checkpoints in our format. Give it the records
    as a `datasets.Dataset`, `data_collator=LlavaCollator(wrapped, ...)`, `processing_class=processor`
    and `SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, ...)` (the collator prepares them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrapped = self.adapted_model()
        wrapped.__dict__.pop("forward", None)  # SFTTrainer's patch on the wrapper: the wrapper's own forward again
        base = wrapped.base_model
        self._base_forward = base.__dict__.get("forward")
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # called inside the guidance

    def create_model_card(self, *args, **kwargs) -> None:
        """Not trl's card (a pipeline for a full model) in the output directory: each checkpoint and
        `save_model` directory has ours (vlm_adapters.card)."""

    def release_fused_head(self) -> None:
        """Take the fused LM head off the base (before `wrapped.unwrap()`, when done training)."""
        base = self.adapted_model().base_model
        base.__dict__.pop("forward", None)
        if self._base_forward is not None:
            base.forward = self._base_forward
