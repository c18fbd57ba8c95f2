"""Extra tokens after each image: grow the prompt, fill the new positions, give back the caller's view.

Adapters that add tokens (TG-DP's detail latents, SemClip's crops) hand over embeddings per image.
The prompt grows by that many filler tokens right after each image's placeholder run; every
per-token input (attention mask, labels, Qwen's mm_token_type_ids, ...) grows with it, rows are
left-padded to one length, and a hook on the input embeddings writes the adapters' embeddings into
the filler positions. The filler tokens count as text, so Qwen's mrope positions stay consistent.
Outputs are mapped back to the caller's positions, so the wrapper stays a drop-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Value of each grown per-token input at inserted and at padding positions (default: 0 and 0).
FILL = {"attention_mask": (1, 0), "labels": (-100, -100)}


@dataclass
class Insertion:
    input_ids: torch.Tensor  # the grown prompt (B, L'), to recognise the call that embeds it
    inserted: torch.Tensor  # (B, L') True where an extra token goes, in image order
    index: torch.Tensor  # (B, L) position in the grown prompt of each original token
    embeddings: torch.Tensor  # (sum of extra tokens, D) in image order
    filled: bool = False  # set when the input embeddings' hook wrote the extra tokens

    def fill(self, embedded: torch.Tensor) -> torch.Tensor:
        return embedded.masked_scatter(self.inserted.unsqueeze(-1), self.embeddings.to(embedded.device, embedded.dtype))

    def for_ids(self, ids: torch.Tensor) -> "Insertion | None":
        """This insertion for a call that embeds `ids`: itself for the grown prompt, one with each row
        repeated for the prompt repeated row by row (generate's num_beams / num_return_sequences), None
        for any other ids (a later decoding step)."""
        own = self.input_ids
        if ids.dim() != 2 or ids.shape[1] != own.shape[1] or ids.shape[0] % own.shape[0]:
            return None
        repeat = ids.shape[0] // own.shape[0]
        if not torch.equal(ids, own if repeat == 1 else own.repeat_interleave(repeat, dim=0)):
            return None
        if repeat == 1:
            return self
        rows = self.embeddings.split(self.inserted.sum(1).tolist())
        return Insertion(ids, self.inserted.repeat_interleave(repeat, dim=0), self.index.repeat_interleave(repeat, dim=0),
                         torch.cat([row for row in rows for _ in range(repeat)]))

    def restore(self, per_token: torch.Tensor) -> torch.Tensor:
        """(B, L', ...) -> (B, L, ...): the values at the caller's own positions."""
        index = self.index.to(per_token.device).view(*self.index.shape, *([1] * (per_token.dim() - 2)))
        return per_token.gather(1, index.expand(-1, -1, *per_token.shape[2:]))


def insert_after_images(inputs: dict, run_ends: torch.Tensor, extra: list[torch.Tensor], *,
                        filler_id: int, pad_id: int) -> tuple[dict, Insertion]:
    """Grow `inputs` by len(extra[i]) tokens after image i's placeholder run.

    run_ends: (n_images, 2) rows of (sample, position after the run), in prompt order.
    """
    ids = inputs["input_ids"]
    batch, length = ids.shape
    counts = torch.tensor([len(e) for e in extra], device=ids.device)
    added = torch.zeros(batch, length + 1, dtype=torch.long, device=ids.device)
    added.index_put_((run_ends[:, 0], run_ends[:, 1]), counts, accumulate=True)
    shift = added.cumsum(1)
    total = shift[:, -1]
    new_length = length + int(total.max())
    index = torch.arange(length, device=ids.device) + shift[:, :length] + (new_length - length - total)[:, None]

    grown = dict(inputs)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:2] == (batch, length):
            at_insert, at_pad = FILL.get(key, (0, 0))
            if key == "input_ids":
                at_insert, at_pad = filler_id, pad_id
            positions = torch.arange(new_length, device=ids.device)
            pad = positions[None] < (new_length - length - total)[:, None]
            out = torch.where(pad, at_pad, at_insert).to(value.dtype)
            grown[key] = out.scatter(1, index, value)
    inserted = torch.ones(batch, new_length, dtype=torch.bool, device=ids.device)
    inserted.scatter_(1, index, False)
    inserted &= torch.arange(new_length, device=ids.device)[None] >= (new_length - length - total)[:, None]
    return grown, Insertion(grown["input_ids"], inserted, index, torch.cat(extra))
