"""Oracle labels for training psi: one JSONL line per (image, question, answer).

    {"id", "image" (path relative to the image root), "question", "answer",
     "boxes" (the candidate crops), "loglik" (log p(answer) with each crop appended), "best"}

`best` is the argmax of `loglik`: the crop that makes the frozen VLM most likely to give the answer.
Writing is resumable: ids already in the output (or in a sharded run's `OUT.shard-N` files) are
skipped, each line is flushed as it is written, and a partial last line (a crash mid-write) is cut
off and redone. Several processes label disjoint shards and merge them into one file, in the
records' order (so identical to a one-process run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import AdapterError, shorten
from ..inputs import open_image
from ..readers import decode, parse_json, read_text
from ..progress import progress_bar

FIELDS = ("id", "image", "question", "answer", "boxes", "loglik", "best")


@dataclass
class LabelReport:
    written: int = 0  # lines added by this run
    already_done: int = 0  # records skipped because their id was in the output
    bad: list = field(default_factory=list)  # BadRecord(id, reason) of the records left out
    total: int | None = None  # labels in the output after the run (known to the first process)


def done_ids(path) -> set[str]:
    """Ids already labelled in `path`. A last line without its newline (a crash mid-write) is cut
    off the file, so that record is labelled again."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    ids = set()
    for n, line in enumerate(decode(data[:end], str(path), _FIX_LINE).splitlines(), 1):
        if line.strip():
            ids.add(str(_parse(line, f"{path} line {n}")["id"]))
    return ids


_FIX_LINE = "delete that line (or the file) and run `semclip label` again"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(line: str, where: str) -> dict:
    label = parse_json(line, where, _FIX_LINE)
    if not isinstance(label, dict) or any(k not in label for k in FIELDS):
        raise AdapterError(f"{where}: a label needs the fields {FIELDS}; {_FIX_LINE}")
    boxes, loglik, best = label["boxes"], label["loglik"], label["best"]
    if (not isinstance(boxes, list) or not boxes or not isinstance(loglik, list) or len(loglik) != len(boxes)
            or any(not isinstance(b, list) or len(b) != 4 or not all(_number(v) for v in b) for b in boxes)
            or not all(_number(v) for v in loglik)
            or not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < len(boxes)):
        raise AdapterError(f"{where}: boxes must be [x0, y0, x1, y1] lists of numbers, one loglik number per box, "
                           f"best an index; {_FIX_LINE}")
    if not isinstance(label["id"], (str, int)) or not all(isinstance(label[k], str) for k in ("image", "question",
                                                                                                 "answer")):
        raise AdapterError(f"{where}: id, image, question and answer must be text; {_FIX_LINE}")
    return label


def read_labels(path) -> list[dict]:
    """Every complete label in a JSONL file (a partial last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"labels file not found: {path} (write it with `vlm-adapters semclip label`)")
    text = read_text(path, "labels file", fix=_FIX_LINE)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a crash mid-write; `label` redoes it
    labels = [_parse(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not labels:
        raise AdapterError(f"{path} holds no labels")
    return labels


def answer_of(record) -> str:
    """The reference answer: the text of the assistant turn right after the image's question."""
    messages = list(record.messages)
    turn = next(i for i, m in enumerate(messages) if any(p["type"] == "image" for p in m["content"]))
    if turn + 1 >= len(messages):
        raise AdapterError("no gpt answer after the question")
    answer = " ".join(p["text"] for p in messages[turn + 1]["content"] if p["type"] == "text").strip()
    if not answer:
        raise AdapterError("the gpt answer is empty")
    return answer


class Shard:
    """This process's share of the labelling: records pending[rank::world_size]; `barrier()` waits for
    every process (accelerate's PartialState.wait_for_everyone under torchrun / accelerate launch)."""

    def __init__(self, rank: int = 0, world_size: int = 1, barrier=None):
        if not 0 <= rank < world_size:
            raise AdapterError(f"shard rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.barrier = rank, world_size, barrier or (lambda: None)

    @classmethod
    def from_accelerate(cls, state) -> "Shard":
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)


def shard_files(out: Path) -> list[Path]:
    """The per-process files next to `out` that a sharded run writes before they are merged."""
    return sorted(out.parent.glob(f"{out.name}.shard-*"))


def label_dataset(wrapped, data, image_root, out, *, on_bad: str = "skip", batch_size: int | None = None,
                  progress: bool = False, on_bad_record=None, shard: Shard | None = None,
                  allow_outside_root: bool = False) -> LabelReport:
    """Run the oracle on every record of LLaVA-format `data` not yet in `out` and append its label.

    A bad record (no question or answer, an image missing, unreadable or cut short) is left out and
    reported (`on_bad_record(BadRecord)` is called at once), or with on_bad="error" stops the run.
    With several processes (`shard`), each labels every world_size-th pending record into its own
    `OUT.shard-RANK` file; then the first merges them into `out`. `out` always ends in the records'
    order, so a sharded run writes the same file as one process. A rerun skips what any file holds.
    An image path that leaves image_root is a bad record unless allow_outside_root (as in training);
    labels hold image paths relative to image_root either way, so the labels and images move together."""
    from ..train.data import BadRecord, read_records
    from .oracle import oracle

    if on_bad not in ("skip", "error"):
        raise AdapterError(f"on_bad={shorten(on_bad)}: choose 'skip' or 'error'")
    shard = shard or Shard()
    root, out = Path(image_root), Path(out)
    records, bad = read_records(data, root, check_images=False, allow_outside_root=allow_outside_root)
    report = LabelReport()

    def reject(item: BadRecord) -> None:
        if on_bad == "error":
            raise AdapterError(f"record {item.id}: {item.reason} (use on_bad_record=skip to leave such records out)")
        report.bad.append(item)
        if on_bad_record is not None:
            on_bad_record(item)

    unique, seen = [], set()
    for record in records:
        if record.id in seen:
            bad.append(BadRecord(record.id, "duplicate id: an earlier record has it"))
        else:
            seen.add(record.id)
            unique.append(record)
    for item in bad:
        if shard.rank == 0 or on_bad == "error":  # reported once; with on_bad=error every process stops
            reject(item)
    mine = out if shard.world_size == 1 else out.with_name(f"{out.name}.shard-{shard.rank}")
    done = _labelled_ids([out, *shard_files(out)], repair=mine)
    pending = [r for r in unique if r.id not in done]
    report.already_done = len(unique) - len(pending) if shard.rank == 0 else 0
    todo = pending[shard.rank :: shard.world_size]
    shard.barrier()  # every process has read what is done before any writes more: one split for all
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(mine, "a", encoding="utf-8") as f, progress_bar(progress and shard.rank == 0) as bar:
        task = bar.add_task("labelling" + (f" (process 0 of {shard.world_size})" if shard.world_size > 1 else ""),
                            total=len(todo), info="")
        for record in todo:
            try:
                image, answer = open_image(record.image), answer_of(record)
                result = oracle(wrapped, image, record.question, answer, batch_size=batch_size)
            except AdapterError as err:
                reject(BadRecord(record.id, str(err)))
                bar.update(task, advance=1)
                continue
            label = {"id": record.id, "image": _relative(record.image, root), "question": record.question,
                     "answer": answer, "boxes": [list(b) for b in result.boxes], "loglik": result.loglik,
                     "best": result.best}
            f.write(json.dumps(label) + "\n")
            f.flush()
            report.written += 1
            bar.update(task, advance=1, info=f"{report.written} written, {len(report.bad)} bad")
    shard.barrier()
    if shard.rank == 0:
        report.total = merge_labels(out, [r.id for r in unique])
    shard.barrier()
    return report


def _labelled_ids(paths: list[Path], repair: Path) -> set[str]:
    """Ids labelled in any of `paths`; `repair` (the file this process appends to) has a partial last
    line cut off; the others are only read (their partial lines are ignored)."""
    ids = set()
    for path in paths:
        if path == repair:
            ids |= done_ids(path)
        elif path.is_file():
            ids |= {str(label["id"]) for label in _complete_labels(path)}
    return ids


def _complete_labels(path: Path) -> list[dict]:
    text = read_text(path, "labels file", fix=_FIX_LINE)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a crash mid-write: that record is labelled again
    return [_parse(line, f"{path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def merge_labels(out, order: list[str]) -> int:
    """Write `out` and its shard files as one labels file in the order of the ids `order` (labels of other
    ids last, as found), one line per id; then delete the shards. Atomic: a kill keeps the old `out`,
    and the shards, so the merge is redone. Returns the number of labels written."""
    out = Path(out)
    shards = shard_files(out)
    by_id: dict[str, dict] = {}
    for path in [out, *shards]:
        if path.is_file():
            for label in _complete_labels(path):
                by_id.setdefault(str(label["id"]), label)
    rank = {rid: i for i, rid in enumerate(order)}
    labels = sorted(by_id.values(), key=lambda label: rank.get(str(label["id"]), len(rank)))
    text = "".join(json.dumps(label) + "\n" for label in labels)
    if shards or not out.is_file() or out.read_text(encoding="utf-8") != text:
        atomic_write_text(out, text, encoding="utf-8")
    for path in shards:
        path.unlink()
    return len(labels)


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root` (with `..` for an image outside it), absolute only on another drive."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return str(path)


def label_examples(labels: list[dict], image_root, allow_outside_root: bool = False) -> list:
    """ScorerExamples from labels: the label's candidate boxes, its best crop as the positive. A label's
    image that leaves image_root is refused unless allow_outside_root."""
    from ..train.data import inside_root
    from .train import ScorerExample

    root = Path(image_root)
    outside = [label["id"] for label in labels if not allow_outside_root and not inside_root(root, label["image"])]
    if outside:
        raise AdapterError(f"labels {shorten(outside[:5])}: their image paths leave the image root {shorten(str(root))}; "
                           "give the root they were labelled with, or allow it (--allow-outside-root, "
                           "data.allow_outside_root=true)")
    return [ScorerExample(image=root / label["image"], question=label["question"], positive=label["best"],
                          boxes=[tuple(b) for b in label["boxes"]], id=str(label["id"])) for label in labels]
