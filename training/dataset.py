"""Load knowledge files (JSON list, JSONL, or OpenAI chat JSONL) into conversations, and tokenize them for training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core import chat
from core.errors import ScalpelError

IGNORE_INDEX = -100  # label value the loss skips: prompt tokens


class InstructionRecord(BaseModel):
    """The plan's format: {instruction, input?, output, concept?}."""

    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)
    concept: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(BaseModel):
    """OpenAI's fine-tuning format: {"messages": [...]}."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=2)
    concept: str | None = None

    @model_validator(mode="after")
    def _has_answer(self):
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("needs at least one assistant message")
        return self


@dataclass
class Example:
    messages: list[dict]
    concept: str
    where: str  # "file:line" or "file[index]", for messages about this example


def _convert(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise ScalpelError(f"{where}: expected a JSON object, got {type(record).__name__}", param=where)
    try:
        if "messages" in record:
            parsed = ChatRecord.model_validate(record)
            messages = [m.model_dump() for m in parsed.messages]
            return Example(messages, parsed.concept or "general", where)
        instruction = InstructionRecord.model_validate(record)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "record"
        raise ScalpelError(
            f"{where}: field '{field}': {err['msg']}", param=f"{where}:{field}", code="invalid_example"
        ) from exc
    user = instruction.instruction if not instruction.input else f"{instruction.instruction}\n\n{instruction.input}"
    if not instruction.output.strip():
        raise ScalpelError(
            f"{where}: field 'output': the answer is empty", param=f"{where}:output", code="invalid_example"
        )
    return Example(
        [{"role": "user", "content": user}, {"role": "assistant", "content": instruction.output}],
        instruction.concept or "general",
        where,
    )


def examples_from_records(records: list, source: str) -> list[Example]:
    """Validate records held in memory as load_examples validates a file's; `source` names them in messages."""
    return [_convert(r, f"{source}[{i}]") for i, r in enumerate(records)]


def as_record(example: Example) -> dict:
    """The chat record an example reads back from: {"messages": [...], "concept": ...}."""
    return {"messages": example.messages, "concept": example.concept}


def examples_hash(examples: list[Example]) -> str:
    """A dataset held in memory has no file to hash: this is file_hash of it written as chat JSONL."""
    text = "".join(json.dumps(as_record(e), ensure_ascii=False) + "\n" for e in examples)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_examples(path: Path) -> list[Example]:
    """Read a JSON list or a JSONL file; every error names the file and the line or index."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ScalpelError(f"dataset file not found: {path}", param=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ScalpelError(f"{path}: not UTF-8 text (byte {exc.start})", param=str(path)) from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScalpelError(
                f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}",
                param=f"{path}:{exc.lineno}",
                code="invalid_json",
            ) from exc
        examples = examples_from_records(records, str(path))
    else:
        examples = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScalpelError(
                    f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})",
                    param=f"{path}:{lineno}",
                    code="invalid_json",
                ) from exc
            examples.append(_convert(record, f"{path}:{lineno}"))
    if not examples:
        raise ScalpelError(f"{path}: no examples", param=str(path), code="empty_dataset")
    return examples


def split_validation(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded share of the examples (at least one, never all) for evaluation."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * share)), len(examples) - 1)
    if n_eval < 1:
        raise ScalpelError("validation_split needs at least 2 examples", param="training_config.validation_split")
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class TemplateInfo:
    """What rendering needs from a base model: its chat template and BOS handling."""

    chat_template: str
    bos_token: str | None
    eos_token: str | None
    add_bos: bool


def tokenize_example(example: Example, tokenizer, info: TemplateInfo, max_length: int) -> dict:
    """Token ids and labels: the loss is taken on assistant answers only, prompts get IGNORE_INDEX."""
    pieces = chat.segments(info.chat_template, example.messages, bos_token=info.bos_token, eos_token=info.eos_token)
    input_ids: list[int] = []
    labels: list[int] = []
    if chat.needs_bos(pieces[0][0], add_bos=info.add_bos, bos_token=info.bos_token):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_answer in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if is_answer else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "concept": example.concept,
        "n_tokens": len(input_ids),
        "truncated": truncated,
    }
