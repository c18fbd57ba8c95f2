"""Checks of tensors read back from a safetensors file against the module they are loaded into."""

from __future__ import annotations

from .errors import AdapterError


def check_dtypes(state: dict, own: dict, file) -> None:
    """AdapterError when a saved tensor's dtype cannot stand for the live one: a float parameter only
    takes floats (any precision: a bf16 save loads into fp32), anything else only its own dtype."""
    wrong = [f"{k} is {state[k].dtype}, expected {v.dtype}" for k, v in own.items() if k in state and (
        (state[k].is_floating_point() != v.is_floating_point()) or (
            not v.is_floating_point() and state[k].dtype != v.dtype))]
    if wrong:
        raise AdapterError(f"{file} holds tensors of the wrong kind ({'; '.join(wrong[:3])}): it was not written "
                           "for this model by this library; re-save it (save_adapters / save_pretrained)")


def check_shapes(state: dict, own: dict, file) -> None:
    """AdapterError naming the tensors of `state` whose shape differs from the live ones in `own`."""
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise AdapterError(f"{file} does not fit this architecture: wrong shapes {wrong[:5]}; give the weights "
                           "saved for this architecture")
