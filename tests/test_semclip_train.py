"""SemClip: training psi, oracle labels (`semclip label`), `semclip train`, `semclip show`, token accounting."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.cli.main import app
from vlm_adapters.cli.semclip import render_scores, run_once
from vlm_adapters.semclip.boxes import propose_boxes
from vlm_adapters.semclip.labels import read_labels
from vlm_adapters.semclip.oracle import chat_prompt
from vlm_adapters.semclip.scorer import RelevanceScorer
from vlm_adapters.semclip.tokens import token_accounts
from vlm_adapters.semclip.train import ScorerExample, _logits, cache_features, positive_index, train_scorer
from vlm_adapters.tiny import build_tiny

from .conftest import save_tiny

# A small random-init open_clip: 224 px with 32 px patches embeds a crop about 5x faster on a CPU
# than PE-Core-T-16-384 (384 px, 16 px patches), and crops dominate these tests.
ARCH = "ViT-S-32-alt"
OPTS = ["--family", "llava", "--scorer-arch", ARCH, "--min-crop-size", "8"]
runner = CliRunner()


# -- psi training on generated canvases --------------------------------------------------------------
COLOURS = ("red", "green", "blue")


def canvas(rng: random.Random, size: int = 48) -> ScorerExample:
    """Two squares of different colours in two cells of a 3x3 grid; the question names one of them
    and the positive is that cell's box (so the scorer has to read the question)."""
    image = Image.new("RGB", (size, size), "white")
    draw, cell = ImageDraw.Draw(image), size // 3
    cells, colours = rng.sample(range(9), 2), rng.sample(COLOURS, 2)
    for k, colour in zip(cells, colours):
        side = rng.randint(cell // 2, cell - 2)
        x, y = (k % 3) * cell + rng.randint(0, cell - side), (k // 3) * cell + rng.randint(0, cell - side)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
    row, col = divmod(cells[0], 3)
    return ScorerExample(image, f"Where is the {colours[0]} square?", boxes=propose_boxes(size, size, scales=[(3, 3)]),
                         positive=(col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))


def test_training_psi_lowers_the_loss_and_raises_agreement():
    rng = random.Random(0)
    train_set, held_out = [canvas(rng) for _ in range(12)], [canvas(rng) for _ in range(8)]
    scorer = RelevanceScorer(arch=ARCH)
    frozen = {k: v.clone() for k, v in scorer.frozen.state_dict().items()}
    cache, val = cache_features(scorer, train_set, batch_size=64), cache_features(scorer, held_out)
    assert cache.image.shape[0] == 12 * 9 and cache.index.shape == (12, 9)

    history = train_scorer(scorer, cache, epochs=20, batch_size=4, val=val)

    assert len(history.loss) == len(history.agreement) == 20
    assert history.loss[-1] < 0.5 * history.initial_loss
    assert history.agreement[-1] >= 0.9 and history.agreement[-1] > history.initial_agreement + 0.25
    assert history.val_agreement[-1] > history.initial_val_agreement  # it generalises to unseen canvases
    assert all(torch.equal(v, frozen[k]) for k, v in scorer.frozen.state_dict().items())  # only the heads train
    # the heads trained on cached embeddings score crops exactly as the scorer does at inference
    crops = torch.cat([scorer.crops(ex.image, ex.boxes) for ex in held_out[:2]])
    with torch.no_grad():
        live = scorer(crops, torch.arange(2).repeat_interleave(9), [ex.question for ex in held_out[:2]])
        cached = _logits(scorer, val, torch.arange(2), 1.0, "cpu")
    torch.testing.assert_close(live.view(2, 9), cached, atol=1e-4, rtol=1e-4)


def test_positive_as_a_box_or_an_index():
    boxes = propose_boxes(90, 60, scales=[(2, 2)])
    assert positive_index(boxes, 3) == 3
    assert positive_index(boxes, boxes[2]) == 2
    assert positive_index(boxes, (50, 35, 88, 58)) == 3  # the candidate it overlaps most
    with pytest.raises(va.AdapterError, match="positive index 4"):
        positive_index(boxes, 4)
    with pytest.raises(va.AdapterError, match="empty question"):
        cache_features(None, [ScorerExample(Image.new("RGB", (8, 8)), " ", 0, boxes=[(0, 0, 8, 8)])])
    with pytest.raises(va.AdapterError, match="outside"):
        cache_features(None, [ScorerExample(Image.new("RGB", (8, 8)), "q", 0, boxes=[(0, 0, 9, 8)])])
    with pytest.raises(va.AdapterError, match="temperature > 0"):
        train_scorer(None, None, temperature=0)


# -- a tiny LLaVA-format dataset with bad records ------------------------------------------------------
def square_image(width: int = 96, height: int = 64, colour: str = "red") -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((width // 8, height // 8, width // 2, height // 2), fill=colour)
    return image


def record(rid: str, image: str, question: str = "What colour is the square?", answer: str = "red") -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                         {"from": "gpt", "value": answer}]}


BAD = {"missing": "image not found", "text": "not an image", "truncated": "truncated", "noq": "no question"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        square_image(colour=colour).save(root / "images" / f"{i}.png")
    (root / "images" / "text.png").write_text("this is not a PNG")
    data = (root / "images" / "0.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    records = [record(f"r{i}", f"{i}.png", answer=c) for i, c in enumerate(("red", "green", "blue"))]
    records += [record("missing", "nowhere.png"), record("text", "text.png"), record("truncated", "truncated.png"),
                record("noq", "0.png", question="")]
    (root / "data.json").write_text(json.dumps(records))
    result = runner.invoke(app, ["semclip", "label", str(root / "data.json"), "--image-root", str(root / "images"),
                                 "--out", str(root / "labels.jsonl"), *OPTS])
    return root, result


def label(root, out, *extra):
    return runner.invoke(app, ["semclip", "label", str(root / "data.json"), "--image-root", str(root / "images"),
                               "--out", str(out), *OPTS, *extra])


def test_label_writes_the_oracle_argmax_and_reports_bad_records(dataset):
    root, result = dataset
    assert result.exit_code == 0, result.output
    labels = read_labels(root / "labels.jsonl")
    assert [x["id"] for x in labels] == ["r0", "r1", "r2"]
    for x in labels:
        assert set(x) == {"id", "image", "question", "answer", "boxes", "loglik", "best"}
        assert x["best"] == max(range(len(x["loglik"])), key=x["loglik"].__getitem__)
        assert [tuple(b) for b in x["boxes"]] == propose_boxes(96, 64, scales=[(2, 2), (3, 3)], overlap=0.1, min_size=8)
        assert x["image"] == f"{x['id'][1]}.png" and x["question"] == "What colour is the square?"
    for rid, why in BAD.items():
        line = result.output.split(f"skipped record {rid}:")[1].split("\n")[0]
        assert why in line
    assert "wrote 3 labels" in result.output and "4 bad record(s)" in result.output


def test_label_resumes_skips_done_ids_and_redoes_a_partial_last_line(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "labels.jsonl"
    complete = (root / "labels.jsonl").read_text()
    out.write_text(complete)
    again = label(root, out)
    assert again.exit_code == 0 and "wrote 0 labels" in again.output and "3 already done" in again.output
    assert out.read_text() == complete

    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a crash in the middle of a line
    resumed = label(root, out)
    assert resumed.exit_code == 0 and "wrote 1 labels" in resumed.output and "2 already done" in resumed.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == [json.loads(line) for line in lines]

    strict = label(root, tmp_path / "strict.jsonl", "--on-bad-record", "error")
    assert strict.exit_code == 2 and "error: record noq" in strict.output


def test_train_saves_heads_that_load_and_show_draws_them(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "psi"
    result = runner.invoke(app, ["semclip", "train", str(root / "labels.jsonl"), "--image-root", str(root / "images"),
                                 "--out", str(out), "--epochs", "5", *OPTS])
    assert result.exit_code == 0, result.output
    assert "trained psi on 3 questions" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    png = tmp_path / "show.png"
    shown = runner.invoke(app, ["semclip", "show", str(root / "images" / "1.png"), "--question", "Where is the square?",
                                "--family", "llava", "--adapters", str(out), "--top-k", "2", "--out", str(png)])
    assert shown.exit_code == 0, shown.output
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 96 * 4 and image.height > 64 * 4  # enlarged, captioned
    assert "#1: box" in shown.output and "#2: box" in shown.output and "13 candidate crops" in shown.output
    assert "visual tokens: 16 overview + 32 (2 crops) = 48" in shown.output  # tiny LLaVA: 16 tokens an image
    assert "all 4 crops of a 2x2 grid + overview (AnyRes-style) = 80" in shown.output


def test_show_rejects_bad_image_files(dataset, tmp_path):
    root, _ = dataset
    cases = {"text.png": "not an image file", "truncated.png": "truncated or corrupt", "nowhere.png": "does not exist"}
    for name, message in cases.items():
        result = runner.invoke(app, ["semclip", "show", str(root / "images" / name), "--question", "Where?",
                                     "--out", str(tmp_path / "x.png"), *OPTS])
        flat = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # rich wraps long paths inside its box
        assert result.exit_code == 2 and message in flat, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    empty = runner.invoke(app, ["semclip", "show", str(root / "images" / "0.png"), "--question", " ",
                                "--out", str(tmp_path / "x.png"), *OPTS])
    assert empty.exit_code == 2 and "--question is empty" in empty.output


def test_show_accepts_a_palette_png_with_transparency(tmp_path):
    path, png = tmp_path / "palette.png", tmp_path / "out.png"
    square_image(70, 50).convert("P").save(path, transparency=0)
    result = runner.invoke(app, ["semclip", "show", str(path), "--question", "Where is the square?", "--out", str(png),
                                 "--scales", "2x2", *OPTS])
    assert result.exit_code == 0, result.output
    with Image.open(png) as image:
        assert image.width == 70 * 6 and image.mode == "RGB"  # enlarged to a readable size


# -- any image mode, and token accounting against what the VLM really adds ------------------------------
@pytest.fixture(scope="module")
def tiny_llava():
    model, processor = build_tiny("llava")
    return va.wrap(model, va.SemClipConfig(top_k=1, scorer_arch=ARCH, min_crop_size=8), processor=processor)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_show_draws_any_image_mode(tiny_llava, mode):
    image = square_image(80, 60).convert(mode)
    if mode == "RGBA":
        image.putalpha(128)
    choice = run_once(tiny_llava, image, "Where is the square?")
    assert len(choice.chosen) == 1 and choice.chosen[0] == max(range(len(choice.scores)), key=choice.scores.__getitem__)
    drawn = render_scores(image, choice)
    assert drawn.width == image.width * 5 and drawn.mode == "RGB"
    (account,) = token_accounts(tiny_llava, [image])
    assert (account.overview, account.crops, account.k, account.grid_crops) == (16, 16, 1, 64)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_token_accounting_matches_the_tokens_the_vlm_adds(family):
    """Qwen2-VL's crops have a size-dependent token count, LLaVA-NeXT's are AnyRes themselves: the
    all-crops cost from the processor equals what the VLM adds when it is fed every grid crop."""
    model, processor = build_tiny(family)
    wrapped = va.wrap(model, va.SemClipConfig(top_k=1, scorer_arch=ARCH, min_crop_size=8), processor=processor)
    image, question = square_image(150, 90), "Where is the square?"
    inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
    with torch.no_grad():
        wrapped(**inputs, images=[image], crop_boxes=[propose_boxes(150, 90, scales=[(2, 2)])])
        every_crop = wrapped.adapters["semclip"].last_choices[0]
        wrapped(**inputs, images=[image])
    (account,) = token_accounts(wrapped, [image])
    choice = wrapped.adapters["semclip"].last_choices[0]
    assert (account.overview, account.crops, account.k) == (choice.overview_tokens, choice.crop_tokens, 1)
    assert account.grid_crops == every_crop.crop_tokens
    assert account.all_crops == account.overview + every_crop.crop_tokens
    assert account.used < account.all_crops and f"= {account.used};" in str(account)

    wrapped.adapters["semclip"].config.top_k = 0
    with torch.no_grad():
        wrapped(**inputs, images=[image])
    (plain,) = token_accounts(wrapped, [image])
    assert (plain.overview, plain.crops, plain.k) == (choice.overview_tokens, 0, 0)


def test_infer_answers_with_saved_semclip_adapters(dataset, tmp_path):
    """`infer --adapters` on a SemClip directory passes the original image on for cropping."""
    root, _ = dataset
    model, processor = save_tiny(tmp_path / "model")
    wrapped = va.wrap(model, va.SemClipConfig(scorer_arch=ARCH, min_crop_size=8, top_k=2), processor=processor)
    wrapped.save_adapters(tmp_path / "psi")
    result = runner.invoke(app, ["infer", "--adapters", str(tmp_path / "psi"), "--model", str(tmp_path / "model"),
                                 "--image", str(root / "images" / "1.png"), "--question", "Where is the square?",
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert f"[adapters {tmp_path / 'psi'}]" in result.output


def test_truncated_images_are_refused_even_when_pil_is_told_to_be_lenient(dataset, monkeypatch):
    """lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES on import; open_image must still refuse a cut file."""
    from PIL import ImageFile

    from vlm_adapters.inputs import open_image

    root, _ = dataset
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(va.AdapterError, match="truncated or corrupt"):
        open_image(root / "images" / "truncated.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was
