"""Write an HF folder's tokenizer into a GGUF the way llama.cpp will tokenize it, or refuse it by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from core.errors import ScalpelError

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """SentencePiece from tokenizer.model or from a SentencePiece-style tokenizer.json ("llama");
    byte-level BPE from tokenizer.json ("gpt2"). Returns the GGUF tokenizer model written."""
    data = _tokenizer_json(folder)
    if (folder / "tokenizer.model").is_file():
        _sentencepiece_vocab(writer, folder, data, vocab_size)
        kind = "llama"
    elif data is None:
        raise ScalpelError(f"{folder} has neither tokenizer.json nor tokenizer.model", param=str(folder))
    elif is_sentencepiece_json(data):
        _sentencepiece_json_vocab(writer, data, vocab_size)
        kind = "llama"
    else:
        _bpe_vocab(writer, data, vocab_size)
        kind = "gpt2"
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
    for which, flag in template_specials(data).items():
        special.add_special_token.setdefault(which, flag)
    special.add_to_gguf(writer, quiet=True)
    return kind


def template_specials(data: dict | None) -> dict[str, bool]:
    """Whether transformers puts a BOS before and an EOS after a single text, read from tokenizer.json's
    TemplateProcessing (alone or inside a Sequence), so llama.cpp's add_bos/add_eos agree with it."""
    post = (data or {}).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            single = step["single"]
            return {"bos": "SpecialToken" in single[0], "eos": len(single) > 1 and "SpecialToken" in single[-1]}
    return {}


def _tokenizer_json(folder: Path) -> dict | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScalpelError(f"{path}: not valid JSON ({exc})", param=str(path), code="invalid_json") from exc


def is_sentencepiece_json(data: dict) -> bool:
    """A tokenizer.json that transformers made from a SentencePiece model: BPE over '▁'-joined text with
    byte fallback, the '▁' put in by a Metaspace pre-tokenizer (transformers 5) or by a Prepend/Replace
    normalizer (older saves)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return True
    normalizers = (data.get("normalizer") or {}).get("normalizers", [data.get("normalizer") or {}])
    return any(n.get("type") == "Replace" and n.get("content") == "▁" for n in normalizers)


def _space_prefix(data: dict) -> bool:
    """Whether the text gets a leading '▁' (llama.cpp's add_space_prefix)."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        if pre.get("split"):
            raise ScalpelError(
                "tokenizer.json: pre_tokenizer.split: true is not supported (llama.cpp's SentencePiece "
                "tokenizer does not split at '▁')",
                param="tokenizer.json: pre_tokenizer.split",
                code="unsupported_tokenizer",
            )
        return pre.get("prepend_scheme", "always") != "never"
    normalizers = (data.get("normalizer") or {}).get("normalizers", [data.get("normalizer") or {}])
    return any(n.get("type") == "Prepend" for n in normalizers)


def _merge_scores(model: dict) -> dict[str, float]:
    """Scores for llama.cpp's SentencePiece merge loop (the highest-scoring adjacent pair is merged first)
    that reproduce the BPE merge order: each merged token scores minus the rank of its first merge."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def _sentencepiece_json_vocab(writer: gguf.GGUFWriter, data: dict, vocab_size: int) -> None:
    model = data["model"]
    scores_of = _merge_scores(model)
    floor = -float(len(scores_of) + 1)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id], scores[token_id] = text, scores_of.get(text, floor)
            types[token_id] = gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
    if model.get("unk_token") in model["vocab"]:
        types[model["vocab"][model["unk_token"]]] = gguf.TokenType.UNKNOWN
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]], scores[added["id"]] = added["content"], 0.0
            if added["content"] == "<unk>":
                types[added["id"]] = gguf.TokenType.UNKNOWN
            else:
                types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(_space_prefix(data))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _bpe_vocab(writer: gguf.GGUFWriter, data: dict, vocab_size: int) -> None:
    model = data["model"]
    if model.get("type") != "BPE":
        raise ScalpelError(
            f"tokenizer.json: model.type: {model.get('type')!r} is not supported (supported: BPE)",
            param="tokenizer.json: model.type",
            code="unsupported_tokenizer",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_type(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


# DeepSeek-Coder's splits, as llama.cpp's "deepseek-coder" pre-tokenizer applies them (then single digits).
DEEPSEEK_CODER_SPLITS = ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+"]


def bpe_pre_type(pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex split before BPE) that tokenizer.json describes.

    Tokenization only matches transformers when this is right, so an unknown one is refused rather
    than guessed.
    """
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    splits = [p.get("pattern", {}).get("Regex") for p in parts[:4]]
    if kinds == ["Split"] * 4 + ["Digits", "ByteLevel"] and splits == DEEPSEEK_CODER_SPLITS:
        return "deepseek-coder"
    if kinds and kinds[0] == "Split":
        pattern = parts[0].get("pattern", {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"\p{N}|" in pattern:
            return "qwen2"
    raise ScalpelError(
        f"tokenizer.json: pre_tokenizer: {kinds} is not a pre-tokenizer llama.cpp is known to match; "
        "supported: GPT-2 byte-level, SmolLM, Llama 3, Qwen2, DeepSeek-Coder, and SentencePiece-style Metaspace "
        "with byte fallback",
        param="tokenizer.json: pre_tokenizer",
        code="unsupported_tokenizer",
    )


def _added_tokens(folder: Path, data: dict | None) -> list[tuple[int, str, bool]]:
    """Tokens added on top of a SentencePiece model (CodeLlama's 16 infill tokens, say), wherever
    transformers recorded them: tokenizer.json, or the older added_tokens.json."""
    if data is not None:
        return [(t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])]
    if (folder / "added_tokens.json").is_file():
        return [(i, text, False) for text, i in json.loads((folder / "added_tokens.json").read_text()).items()]
    return []


def _sentencepiece_vocab(writer: gguf.GGUFWriter, folder: Path, data: dict | None, vocab_size: int) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    for token_id, text, special in _added_tokens(folder, data):
        if token_id < vocab_size and (token_id >= sp.vocab_size() or tokens[token_id] != text):
            tokens[token_id], scores[token_id] = text, -1000.0
            types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
