"""`vlm-adapters bench gpu`: one prepared check of every family and method on a GPU (bf16, sdpa and
flash-attention, 4-bit and 8-bit bases), that also runs on the CPU at tiny sizes so it never rots.

    results = run(REAL)                        # a CUDA machine: the real sizes, bf16
    results = run(tiny_sizes(), tiny=True)     # anywhere: the same code on the tiny models
    print(markdown(results))

For each size (vlm_adapters.families; random weights, nothing downloaded) the model is first built on
the meta device (its parameter bytes, checked against free GPU memory), then materialised on the
device in the check's dtype; for each attention kernel (sdpa, and flash_attention_2 where flash_attn
imports) and each method the family takes, one row: a forward with labels, `generate` of 8 tokens and
one adapter-only AdamW step (its loss finite, its gradients finite and only in adapter weights, its
weights moved). Then SemClip's oracle labelling, batched (every crop in one call, the shared prefix
where the family allows) against crop by crop; then LLaVA-1.5-7B and Qwen2-VL-7B shapes saved and
reloaded through `from_pretrained` in 4-bit and 8-bit (bitsandbytes) with TG-FOM and TIE. Every row
records its latency and peak memory; a row that fails records its error and the check goes on.
"""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import tempfile
import time
from importlib import metadata

import torch

import vlm_adapters as va

from ..families import REAL, SIZES
from ..provenance import provenance
from .perf_labelling import ANSWER as ORACLE_ANSWER
from .perf_labelling import QUESTION as ORACLE_QUESTION
from .perf_setups import call_kwargs, model_inputs, setups
from .perf_timers import Clock, PeakMemory
from .perf_training import train_batch
from .sizes import build

METHODS = ("TG-FOM", "TG-DP", "SemClip", "TIE")
QUANTIZED = {"llava-1.5-7b": "tiny-llava", "qwen2-vl-7b": "tiny-qwen2_vl"}  # real size -> its tiny stand-in
QUANTIZED_METHODS = ("TG-FOM", "TIE")
NEW_TOKENS = 8


def tiny_sizes() -> tuple[str, ...]:
    """The tiny stand-in of every family that has a real size."""
    families = dict.fromkeys(SIZES[n].family for n in REAL)
    return tuple(f"tiny-{f}" for f in families if f"tiny-{f}" in SIZES)


def attentions(device) -> list[str]:
    """sdpa, and flash_attention_2 where flash_attn imports and the device is CUDA."""
    fa2 = torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return ["sdpa", *(["flash_attention_2"] if fa2 else [])]


def bits_unavailable(device) -> str | None:
    """Why 4-bit and 8-bit bases cannot be checked here (None: they can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'vlm-adapters[gpu]')"
    if torch.device(device).type != "cuda":
        return "bitsandbytes needs a CUDA device"
    return None


def _error(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:300]}"


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def meta_bytes(size: str, dtype) -> int:
    """Parameter bytes of size `size` in `dtype`, from a model built on the meta device (no memory)."""
    from ..families import parts

    model_cls, config, _ = parts(SIZES[size])
    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def materialise(size: str, device, dtype, attention: str):
    """(model, processor, image) of `size` on `device` in `dtype` with `attention`; refused before any
    allocation when its parameters alone exceed the free GPU memory."""
    if torch.device(device).type == "cuda" and not size.startswith("tiny-"):
        need, (free, _) = meta_bytes(size, dtype), torch.cuda.mem_get_info()
        if need > free:
            raise MemoryError(f"{size} needs {need / 2**30:.1f} GiB of parameters, {free / 2**30:.1f} GiB free")
    model, processor, image = build(size, device=device, dtype=dtype)
    model.set_attn_implementation(attention)
    return model, processor, image


def _on(batch: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
            v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_method(model, processor, image, size: str, method: str, *, device, dtype) -> dict:
    """One row: wrap with `method`, a forward with labels, generate NEW_TOKENS, one adapter-only step."""
    from vlm_adapters.integrations import get_shim

    clock = Clock(device)
    torch.manual_seed(0)
    wrapped = va.wrap(model, *setups(size)[method], processor=processor)
    try:
        batch = _on(train_batch(processor, image, 1, get_shim(model).image_token_id), device, dtype)
        extra = call_kwargs(wrapped, image)
        row = {}
        with PeakMemory(device) as memory:
            wrapped.eval()
            start = clock()
            with torch.no_grad():
                loss = wrapped(**batch, **extra).loss
            row["forward_ms"] = 1000 * (clock() - start)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"forward loss is {loss.item()}")
            inputs = model_inputs(processor, image, device, dtype)
            start = clock()
            with torch.no_grad():
                out = wrapped.generate(**inputs, **extra, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       do_sample=False)
            row["generate_ms"] = 1000 * (clock() - start)
            new = out.shape[1] - inputs["input_ids"].shape[1]
            if new != NEW_TOKENS:
                raise AssertionError(f"generate gave {new} new tokens, not {NEW_TOKENS}")
            step = _psi_step if method == "SemClip" else _step
            row["step_ms"], row["loss"] = step(wrapped, batch, extra, clock)
        row["peak_mb"] = memory.peak_mb
        return row
    finally:
        wrapped.unwrap()


def _step(wrapped, batch: dict, extra: dict, clock) -> tuple[float, float]:
    """One AdamW step of the adapters only: (ms, loss). Its gradients must be finite, some non-zero,
    none on the base; its weights must move."""
    params = wrapped.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    wrapped.train()
    start = clock()
    loss = wrapped(**batch, **extra).loss
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    optimizer.step()
    ms = 1000 * (clock() - start)
    wrapped.eval()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}")
    if not grads or not all(torch.isfinite(g).all() for g in grads) or not any(g.abs().sum() > 0 for g in grads):
        raise FloatingPointError("the adapters' gradients are missing, zero or not finite")
    if any(p.grad is not None for p in wrapped.base_model.parameters()):
        raise AssertionError("a base weight received a gradient")
    if all(torch.equal(a, p.detach()) for a, p in zip(before, params)):
        raise AssertionError("the optimizer step moved no adapter weight")
    optimizer.zero_grad(set_to_none=True)
    return ms, loss.item()


def _psi_step(wrapped, batch: dict, extra: dict, clock) -> tuple[float, float]:
    """SemClip's training step: its scorer psi trains apart from the VLM (InfoNCE over the crops of
    the image, frozen CLIP features): one epoch of one example; its heads must move."""
    from ..semclip.train import ScorerExample, cache_features, train_scorer

    semclip = wrapped.adapters["semclip"]
    scorer = semclip.scorer
    before = [p.detach().clone() for p in scorer.image_head.parameters()]
    start = clock()
    cache = cache_features(scorer, [ScorerExample(extra["images"][0], batch["guidance_text"][0], positive=0)],
                           proposals=semclip.proposals)
    history = train_scorer(scorer, cache, epochs=1)
    ms = 1000 * (clock() - start)
    if all(torch.equal(a, p.detach()) for a, p in zip(before, scorer.image_head.parameters())):
        raise AssertionError("psi's training step moved no weight of its heads")
    return ms, history.loss[-1]


def check_oracle(model, processor, image, size: str, *, device) -> dict:
    """SemClip's oracle: every crop in one call (the shared prefix where the family allows) against crop
    by crop; the row's error when the two disagree by more than bf16 rounding allows."""
    from ..semclip.oracle import oracle, shares_prefix

    clock = Clock(device)
    wrapped = va.wrap(model, *setups(size)["SemClip"], processor=processor).eval()
    try:
        with PeakMemory(device) as memory:
            start = clock()
            batched = oracle(wrapped, image, ORACLE_QUESTION, ORACLE_ANSWER, batch_size=None)
            batched_ms = 1000 * (clock() - start)
        start = clock()
        single = oracle(wrapped, image, ORACLE_QUESTION, ORACLE_ANSWER, batch_size=1, share_prefix=False)
        single_ms = 1000 * (clock() - start)
        gap = max(abs(a - b) for a, b in zip(batched.loglik, single.loglik))
        tolerance = 1e-3 if model.dtype == torch.float32 else 0.5  # summed log-probs of a few tokens
        if gap > tolerance:
            raise AssertionError(f"batched and crop-by-crop log-likelihoods differ by {gap:.3g} (> {tolerance})")
        return {"forward_ms": batched_ms, "crop_by_crop_ms": single_ms, "peak_mb": memory.peak_mb,
                "candidates": len(batched.loglik), "shared_prefix": shares_prefix(wrapped), "loglik_gap": gap}
    finally:
        wrapped.unwrap()


def quantized_base(model_cls, folder: str, bits: int, *, device):
    """The model saved in `folder`, reloaded with bitsandbytes in `bits` bits, as a user loads one."""
    from ..bases import LoadOptions

    options = LoadOptions(device_map={"": torch.device(device).index or 0}, quantization=f"{bits}bit")
    return model_cls.from_pretrained(folder, dtype=torch.bfloat16, **options.from_pretrained_kwargs()).eval()


def _record(rows: list, base: dict, echo, fn, *args, **kwargs) -> None:
    """Run fn(*args, **kwargs) -> dict as one row of `base`; a failure is the row's error, and the check
    goes on."""
    start = time.perf_counter()
    try:
        row = base | {"status": "ok"} | fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure is a row, never the end of the check
        row = base | {"status": "failed", "error": _error(err)}
    row["wall_s"] = time.perf_counter() - start
    rows.append(row)
    if echo:
        echo(f"{row['size']} {row['attention']} {row['bits']}-bit {row['method']}: {row['status']}"
             + (f" ({row['error']})" if "error" in row else ""))


def run(sizes, *, tiny: bool = False, device=None, dtype=None, methods=METHODS, attention=None, quantized: bool = True,
        oracle: bool = True, budget_s: float | None = None, echo=None, on_size=None) -> dict:
    """Every row of the check; JSON-ready. `tiny`: the quantized rows use the tiny stand-ins. Once
    `budget_s` seconds have passed, the sizes not begun are recorded as skipped. `on_size(results)`
    after each size (to save what is done)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kernels = attention or attentions(device)
    bits = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    started = time.perf_counter()
    results = {"provenance": provenance(settings={"sizes": list(sizes), "tiny": tiny, "methods": list(methods),
                                                  "attention": kernels, "budget_s": budget_s}),
               "device": describe(device), "dtype": str(dtype).removeprefix("torch."), "new_tokens": NEW_TOKENS,
               "seconds": 0.0, "rows": []}
    rows = results["rows"]

    def left() -> bool:
        return budget_s is None or time.perf_counter() - started < budget_s

    def done():
        results["seconds"] = time.perf_counter() - started
        if on_size:
            on_size(results)

    for size in sizes:
        for kernel in kernels:
            base = {"size": size, "attention": kernel, "bits": bits}
            if not left():
                rows.append(base | {"method": "all", "status": "skipped", "error": "the time budget was spent"})
                continue
            try:
                model, processor, image = materialise(size, device, dtype, kernel)
            except Exception as err:  # noqa: BLE001
                rows.append(base | {"method": "build", "status": "failed", "error": _error(err)})
                _free(device)
                continue
            refused = model_refuses(model)
            for method in methods:
                if method not in refused:
                    _record(rows, base | {"method": method}, echo, check_method, model, processor, image, size, method,
                            device=device, dtype=dtype)
            if oracle and "SemClip" not in refused and kernel == kernels[0]:
                _record(rows, base | {"method": "oracle"}, echo, check_oracle, model, processor, image, size,
                        device=device)
            del model
            _free(device)
        done()
    if quantized:
        quantized_rows(sizes, tiny=tiny, device=device, rows=rows, echo=echo, left=left)
        done()
    results["seconds"] = time.perf_counter() - started
    return results


def model_refuses(model) -> set[str]:
    """The check's methods the model's family refuses (vlm_adapters.integrations)."""
    from vlm_adapters.integrations import get_shim

    from .perf_setups import METHOD

    refuses = get_shim(model).spec.refuses
    return {m for m in METHODS if METHOD[m] in refuses}


def quantized_rows(sizes, *, tiny: bool, device, rows: list, echo=None, left=lambda: True) -> None:
    """LLaVA-1.5-7B and Qwen2-VL-7B (or their tiny stand-ins) saved once, then reloaded in 4-bit and in
    8-bit, each with TG-FOM and TIE; appended to `rows`."""
    why = bits_unavailable(device)
    for real, small in QUANTIZED.items():
        size = small if tiny else real
        if size not in sizes:
            continue
        with tempfile.TemporaryDirectory(prefix="vlm-adapters-gpu-") as folder:
            saved = model_cls = None
            for bits in (4, 8):
                base = {"size": size, "attention": "sdpa", "bits": bits}
                skip = why or (None if left() else "the time budget was spent")
                if skip:
                    rows.extend(base | {"method": m, "status": "skipped", "error": skip} for m in QUANTIZED_METHODS)
                    continue
                try:
                    if saved is None:
                        model, saved, image = materialise(size, device, torch.bfloat16, "sdpa")
                        model_cls = type(model)
                        model.save_pretrained(folder)
                        saved.save_pretrained(folder)
                        del model
                        _free(device)
                    model = quantized_base(model_cls, folder, bits, device=device)
                except Exception as err:  # noqa: BLE001
                    rows.append(base | {"method": "build", "status": "failed", "error": _error(err)})
                    _free(device)
                    continue
                for method in QUANTIZED_METHODS:
                    _record(rows, base | {"method": method}, echo, check_method, model, saved, image, size, method,
                            device=device, dtype=torch.bfloat16)
                del model
                _free(device)


def describe(device) -> dict:
    """The device and the versions that decide whether the rows pass."""
    out = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "flash_attn", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10, check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def _cell(value, fmt="{:.0f}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    """The rows as a markdown table, after a line naming the device, dtype and versions."""
    d = results["device"]
    where = d.get("gpu") or d["type"]
    head = (f"{where}" + (f", driver {d['driver']}" if d.get("driver") else "") + f", {results['dtype']}; torch "
            f"{d['torch']} (CUDA {d['cuda']}), transformers {d['transformers']}, flash_attn {d['flash_attn'] or '-'}, "
            f"bitsandbytes {d['bitsandbytes'] or '-'}; {results['seconds']:.0f} s in all")
    rows = results["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    lines = [head, "", f"{counts['ok']} rows ok, {counts['failed']} failed, {counts['skipped']} skipped.", "",
             "| size | attention | bits | method | status | forward ms | generate ms | step ms | peak MB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or (f"{r['candidates']} crops, crop by crop {r['crop_by_crop_ms']:.0f} ms, "
                                  f"log-lik gap {r['loglik_gap']:.2g}" if r["method"] == "oracle" else "")
        lines.append(f"| {r['size']} | {r['attention']} | {r['bits']} | {r['method']} | {r['status']} | "
                     f"{_cell(r.get('forward_ms'))} | {_cell(r.get('generate_ms'))} | {_cell(r.get('step_ms'))} | "
                     f"{_cell(r.get('peak_mb'))} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
