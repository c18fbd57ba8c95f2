"""`vlm_adapters` as an lmms-eval model: any supported VLM, plain or with adapters, on any image task.

    lmms-eval --model vlm_adapters --model_args pretrained=llava-hf/llava-1.5-7b-hf,adapters=out/ \\
        --tasks vlm_world --include_path world/ --batch_size 8

model_args: `pretrained` (hub id or directory; default: the adapters' base), `adapters` (an adapter
directory or a training output directory), `semclip` (true, or a JSON object of SemClipConfig
fields), `dtype` (float32, bfloat16, float16), `device` (auto, cpu, cuda:0 ...), `batch_size`,
`max_new_tokens` (when a task sets none); for big bases `device_map` (auto, a device, or a JSON map
module -> device / disk), `offload_folder`, `quantization` (4bit, 8bit or BitsAndBytesConfig fields as
JSON; a CUDA GPU only) and `attn_implementation` (sdpa, eager, flash_attention_2 ...). Each request's
context is the user turn after its images, in the processor's chat template; answers are decoded
greedily unless the task samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..bases import LoadOptions, check_device, move
from ..devices import execution_device
from ..errors import AdapterError
from ..inputs import to_rgb
from ..processing import process
from ..train.model import torch_dtype
from .load import load, plan


class VLMAdapters(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, adapters: str | None = None, semclip=None,
                 dtype: str = "float32", device: str = "auto", batch_size: int | str = 1,
                 max_new_tokens: int = 256, max_batch_size: int | None = None, device_map=None,
                 offload_folder: str | None = None, quantization=None, attn_implementation: str | None = None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise AdapterError(f"unknown model_args {sorted(unknown)}: use pretrained, adapters, semclip, "
                               "dtype, device, batch_size, max_new_tokens, device_map, offload_folder, "
                               "quantization, attn_implementation")
        if str(batch_size).startswith("auto"):  # max_batch_size goes with auto: unused
            raise AdapterError("batch_size=auto is not supported: give a number")
        torch_dtype(dtype, "dtype=")
        options = LoadOptions(device_map, quantization, attn_implementation, offload_folder)
        check_device(device, options)
        checked = plan(pretrained, adapters, semclip)  # bad arguments fail here, before any loading
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: a full copy of the model per process
            if options.device_map is not None:
                raise AdapterError("device_map splits one model; with several processes each holds a whole copy: "
                                   "run one process, or drop device_map")
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
        self.model, self.processor = load(checked, dtype, options)
        move(self.model, device, options)
        self.tokenizer = self.processor.tokenizer
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.needs_images = getattr(self.model, "wants_images", False)  # SemClip, TG-DP: the PIL images too

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (the first one of a split base)."""
        return execution_device(self.model.get_input_embeddings())

    # -- inputs -------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        out = []
        for v in visuals or []:
            if not isinstance(v, Image.Image):
                raise AdapterError(f"task {task}: vlm_adapters scores images only, got a {type(v).__name__} visual")
            out.append(to_rgb(v))
        return out

    def _prompt(self, context: str, n_images: int) -> str:
        """One user turn (its images, then the context), ready for the answer; as inputs.chat_prompt."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _inputs(self, texts: list[str], images: list[list[Image.Image]]):
        flat = [image for row in images for image in row]
        inputs = process(self.processor, texts, images, padding_side="left")
        extra = {"images": flat} if self.needs_images and flat else {}
        return inputs.to(self.device, dtype=self.model.dtype), extra  # floating tensors take the model's dtype

    # -- requests -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched decoding, cut at the task's stop strings; batches share generation kwargs."""
        collator = utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        out = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_adapters generate") as bar:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)  # tasks may mix
                images = [self._visuals(*a) for a in zip(doc_to_visual, tasks, splits, doc_ids)]
                kwargs = dict(all_kwargs[0])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                inputs, extra = self._inputs([self._prompt(c, len(i)) for c, i in zip(contexts, images)], images)
                ids = self.model.generate(**inputs, **extra, **self._decoding(kwargs),
                                          pad_token_id=self.tokenizer.pad_token_id)
                texts = self.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for text in texts:
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out.append(text)
                bar.update(len(chunk))
        return collator.get_original(out)

    def _decoding(self, kwargs: dict) -> dict:
        temperature = float(kwargs.get("temperature") or 0)
        sample = bool(kwargs.get("do_sample")) or temperature > 0
        longest = kwargs.get("max_new_tokens") or kwargs.get("max_gen_toks") or self.max_new_tokens
        decoding = {"max_new_tokens": int(longest),
                    "num_beams": int(kwargs.get("num_beams") or 1), "do_sample": sample}
        if sample:
            decoding.update(temperature=temperature or 1.0, top_p=kwargs.get("top_p") or 1.0)
        return decoding

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(loss, is_greedy) per request, batched. As lmms-eval's own models (and its multiple-choice
        scoring, which takes the argmin) expect, `loss` is the continuation's mean negative
        log-likelihood per token; `is_greedy`: greedy decoding would give the continuation.
        Each pair comes wrapped in a GenerationResult: lmms-eval 0.7.3 turns a bare tuple into its
        string (`unwrap_generation_output`), and passes a GenerationResult's `text` on unchanged."""
        items = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # a task whose target is a list: score the first
                continuation = continuation[0]
            items.append((context, str(continuation), self._visuals(doc_to_visual, task, split, doc_id)))
        collator = utils.Collator(items, lambda a: (-len(a[0]) - len(a[1]), a[0]))
        out = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_adapters loglikelihood") as bar:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                out += self._score(chunk)
                bar.update(len(chunk))
        return [GenerationResult(text=pair) for pair in collator.get_original(out)]

    def _score(self, chunk) -> list[tuple[float, bool]]:
        prompts = [self._prompt(context, len(images)) for context, _, images in chunk]
        wholes = [p + cont for p, (_, cont, _) in zip(prompts, chunk)]
        # continuation tokens: those the whole text has beyond its prompt (the lm-eval convention)
        lengths = [len(self.tokenizer(w).input_ids) - len(self.tokenizer(p).input_ids) for p, w in zip(prompts, wholes)]
        if min(lengths) < 1:
            raise AdapterError("an empty continuation cannot be scored")
        inputs, extra = self._inputs(wholes, [images for _, _, images in chunk])
        logits = self.model(**inputs, **extra).logits
        ids = inputs["input_ids"]
        results = []
        for row, n in enumerate(lengths):  # left padding: the continuation is each row's last n tokens
            logprobs = F.log_softmax(logits[row, -n - 1 : -1].float(), dim=-1)
            target = ids[row, -n:]
            loss = -logprobs.gather(-1, target[:, None]).mean().item()
            results.append((loss, bool((logprobs.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise AdapterError("vlm_adapters does not run multi-round tasks")
