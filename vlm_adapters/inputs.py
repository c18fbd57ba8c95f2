"""Reading user inputs: an image file (with a clear error when it cannot be read), a chat prompt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import AdapterError, ImageTooLarge, shorten

MAX_PIXELS_ENV = "VLM_ADAPTERS_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: above that an image costs gigabytes before it is resized
MAX_ASPECT = 200  # no VLM here takes a longer strip (Qwen2-VL's processor refuses 200:1)
IMAGE_PLACEHOLDER = "<image>"


def max_pixels() -> int:
    """The library's pixel limit: VLM_ADAPTERS_MAX_PIXELS, else 40 megapixels."""
    raw = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        return int(float(raw)) if raw.strip() else DEFAULT_MAX_PIXELS
    except ValueError:
        raise AdapterError(f"{MAX_PIXELS_ENV}={shorten(raw)} is not a number of pixels (e.g. 40000000)") from None


def check_size(width: int, height: int, what) -> None:
    """ImageTooLarge for an image too large (pixels) or too thin (aspect ratio) for the VLMs."""
    limit = max_pixels()
    if width * height > limit:
        raise ImageTooLarge(f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
                            f"{limit / 1e6:g}: downscale it, or raise the limit with {MAX_PIXELS_ENV}=...")
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageTooLarge(f"{what} is {width}x{height}: an aspect ratio above {MAX_ASPECT}:1 is not supported; "
                            "crop or pad it to a less extreme shape")


def open_image(path) -> Image.Image:
    """The image at `path`, fully decoded (any mode) and turned upright by its EXIF orientation (as
    every viewer shows it). AdapterError if it is missing, not an image, or cut short; ImageTooLarge
    (a subclass) if it is above the size limit, checked from the header before any pixel is decoded.
    Every reader of image files (training, its record check, infer, SemClip, labelling) goes here."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"image not found: {path}")
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES  # some libraries (lmms-eval) turn this on globally on import
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            check_size(*image.size, f"image {path}")
            image.load()  # the whole decode: a file cut short fails here, not later in a batch
            return ImageOps.exif_transpose(image)  # a copy, upright
    except AdapterError:
        raise  # ImageTooLarge: a policy, not a damaged file
    except UnidentifiedImageError:
        reason = "not an image file PIL can read (give a PNG, JPEG, WebP, ... file)"
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {path} is above PIL's own size limit ({err}): downscale it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = f"truncated or corrupt ({err}); re-export or replace the file"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    raise AdapterError(f"cannot read image {path}: {reason}")


def check_text(text: str, what: str = "the question") -> None:
    """AdapterError for text a tokenizer cannot take: invalid UTF-8 (lone surrogates, as Python
    reads undecodable bytes) or NUL characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise AdapterError(f"{what} is not valid UTF-8 text (bad character at position {err.start}): "
                           "re-type it, or save the file it came from as UTF-8") from None
    if "\x00" in text:
        raise AdapterError(f"{what} contains a NUL character (position {text.index(chr(0))}): remove it")


def check_question(question: str, what: str = "the question") -> None:
    """check_text, and no literal image placeholder (the prompt template places the image)."""
    if not isinstance(question, str) or not question.strip():
        raise AdapterError(f"{what} must be non-empty text, got {shorten(question)}")
    check_text(question, what)
    if IMAGE_PLACEHOLDER in question:
        raise AdapterError(f"{what} contains {shorten(IMAGE_PLACEHOLDER)}: remove it (the prompt template places the image)")


def chat_prompt(processor, question: str) -> str:
    """The processor's chat template for one user turn with one image, ready for the answer."""
    check_question(question)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def call_images(images, n: int, who: str, *, required: bool = False) -> list[Image.Image] | None:
    """The original images an adapter was given (`images=[...]` at the call), one per image in the
    prompts, as RGB; None if none were given and they are not `required`. `who` says which adapter
    wants them and why."""
    if images is None and not required:
        return None
    if images is None or isinstance(images, Image.Image) or len(images) != n:
        got = "none" if images is None else 1 if isinstance(images, Image.Image) else len(images)
        raise AdapterError(f"{who}: pass images=[...], a list of the {n} PIL image(s) given to the processor, "
                           f"in prompt order (got {got})")
    return [to_rgb(image) for image in images]


def to_rgb(image) -> Image.Image:
    """RGB for any PIL mode: transparent pixels (RGBA, LA, palette with transparency) over white,
    16-bit and 32-bit greyscale (I;16, I) and float (F) scaled to 8 bits, never clipped."""
    if not isinstance(image, Image.Image):
        raise AdapterError(f"images must be PIL images, got {type(image).__name__}")
    check_size(*image.size, "the image")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_to_8bit(image, np.asarray(image)), "L").convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image, values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    if image.mode == "F":  # floats: [0, 1] when they fit, else the 8-bit range
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        scale = 255.0 / 65535.0  # 16-bit samples (PIL opens some 16-bit PNGs as mode I)
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(values * scale) + 0.5, 0, 255).astype(np.uint8)
