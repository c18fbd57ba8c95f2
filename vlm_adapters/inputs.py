"""Reading user inputs: an image file (with a clear error when it cannot be read), a chat prompt."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import AdapterError


def open_image(path) -> Image.Image:
    """The image at `path`, fully read (any mode); AdapterError if it is missing, not an image or cut short."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"image not found: {path}")
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES  # some libraries (lmms-eval) turn this on globally on import
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except UnidentifiedImageError:
        reason = "not an image file PIL can read (give a PNG, JPEG, WebP, ... file)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = f"truncated or corrupt ({err}); re-export or replace the file"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    raise AdapterError(f"cannot read image {path}: {reason}")


def chat_prompt(processor, question: str) -> str:
    """The processor's chat template for one user turn with one image, ready for the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
