"""Every Llama-family folder users bring, as a tiny random model: f32 logits and tokens match PyTorch."""

from __future__ import annotations

import llama_cpp
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conversion.hf_to_gguf import convert_base
from conversion.verify import verify
from core.errors import ScalpelError
from core.gguf_meta import read_gguf
from tests.conversion.test_tokenizer import LLAMA_CPP_STRINGS, llama_tokens
from tests.tiny_models import ARCHITECTURES, build_tiny_llama, build_tiny_spm_llama
from training.base_model import match_llama_cpp_spm

SPM_SPECIALS = ["<s>[INST] hi [/INST]", "a<extra_15>b", "<extra_3> b", "x <extra_1><extra_2> y", "</s>  z"]
BPE_SPECIALS = ["<|im_start|>user\n  hi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|> 42", "a<|im_end|>b"]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def converted(request, tmp_path_factory):
    builder, kind = ARCHITECTURES[request.param]
    folder = builder(tmp_path_factory.mktemp("arch") / "model")
    out = folder.parent / "model-f32.gguf"
    convert_base(folder, out, outtype="f32", progress=False)
    return request.param, kind, folder, out


def _tokenizer(folder):
    return match_llama_cpp_spm(AutoTokenizer.from_pretrained(folder))


def test_f32_logits_match(converted):
    _, _, folder, out = converted
    report = verify(AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), _tokenizer(folder), out)
    assert report.passed and report.max_abs <= 1e-3 and report.top1 == 1.0


def test_tokens_match_on_llama_cpp_test_strings(converted):
    _, kind, folder, out = converted
    tokenizer = _tokenizer(folder)
    specials = SPM_SPECIALS if "SentencePiece" in kind else BPE_SPECIALS
    differ = [
        t
        for t in LLAMA_CPP_STRINGS + specials
        if llama_tokens(out, t) != tokenizer(t, add_special_tokens=False)["input_ids"]
    ]
    assert not differ


def test_bos_and_eos_are_added_as_transformers_adds_them(converted):
    _, _, folder, out = converted
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(b"Hello world", add_bos=True, special=True)
    finally:
        llm.close()
    assert got == _tokenizer(folder)("Hello world")["input_ids"]


def test_metadata_records_the_details(converted):
    name, kind, _, out = converted
    meta = read_gguf(out, with_tokens=False).metadata
    arch = meta["general.architecture"]
    assert meta["tokenizer.ggml.model"] == ("llama" if "SentencePiece" in kind else "gpt2")
    if "codellama" in name:
        assert meta[f"{arch}.rope.freq_base"] == pytest.approx(1e6)
    if "mistral" in name:
        assert meta[f"{arch}.attention.sliding_window"] == 128
    if "llama3" in name:
        assert meta[f"{arch}.rope.freq_base"] == pytest.approx(5e5)
    tensors = read_gguf(out, with_tokens=False).tensors
    assert ("output.weight" in tensors) == ("tied" not in name)
    if "qwen" in name:
        assert "blk.0.attn_q.bias" in tensors


def test_spm_json_scores_follow_the_merge_order(tmp_path):
    """llama.cpp merges the highest-scoring pair first: scores must fall with each merge's rank."""
    from conversion.vocab import _merge_scores

    scores = _merge_scores({"merges": [["▁", "a"], "b c", ["▁a", "bc"]]})
    assert scores == {"▁a": 0.0, "bc": -1.0, "▁abc": -2.0}


def test_yarn_rope_is_refused_naming_the_field(tmp_path):
    import json

    folder = build_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScalpelError, match=r"config.json: rope_scaling.rope_type: yarn is not supported"):
        convert_base(folder, tmp_path / "out.gguf", outtype="f32", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*gguf*"))


def test_other_architectures_are_refused_by_name(tmp_path):
    import json

    folder = build_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GemmaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScalpelError, match="GemmaForCausalLM"):
        convert_base(folder, tmp_path / "out.gguf", outtype="f32", progress=False)


def test_metaspace_split_is_refused_naming_the_field(tmp_path):
    import json

    folder = build_tiny_spm_llama(tmp_path / "m", json_only=True)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"]["split"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(ScalpelError, match=r"tokenizer.json: pre_tokenizer.split"):
        convert_base(folder, tmp_path / "out" / "x.gguf", outtype="f32", progress=False)
    assert not list((tmp_path / "out").iterdir()), "the GGUF was being written: nothing of it may remain"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "config.json: hidden_size is missing"),
        ({"num_hidden_layers": "2"}, "config.json: num_hidden_layers must be a positive integer, not '2'"),
        ({"vocab_size": 0}, "config.json: vocab_size must be a positive integer, not 0"),
    ],
)
def test_bad_config_sizes_are_named(tmp_path, change, message):
    import json

    folder = build_tiny_llama(tmp_path / "m")
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ScalpelError, match=message):
        convert_base(folder, tmp_path / "out.gguf", outtype="f32", progress=False)
    assert not (tmp_path / "out.gguf").exists()


def test_the_gguf_loaded_tokenizer_matches_too(converted):
    """Training on a GGUF base loads its tokenizer from the GGUF: from our scores it must tokenize as llama.cpp."""
    _, kind, _, out = converted
    if kind.endswith("deepseek-coder"):
        pytest.xfail("transformers' GGUF tokenizer loader does not rebuild DeepSeek-Coder's pre-tokenizer splits")
    tokenizer = match_llama_cpp_spm(AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name))
    specials = SPM_SPECIALS if "SentencePiece" in kind else BPE_SPECIALS
    texts = LLAMA_CPP_STRINGS + specials
    assert [t for t in texts if llama_tokens(out, t) != tokenizer(t, add_special_tokens=False)["input_ids"]] == []


def test_older_sentencepiece_tokenizer_json_converts_too(tmp_path):
    """Before transformers 5 the '▁' came from a Prepend/Replace normalizer (no pre-tokenizer): same vocabulary."""
    import json

    folder = build_tiny_spm_llama(tmp_path / "m", json_only=True)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = None
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    for token in data["added_tokens"]:
        token["normalized"] = False
    (folder / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "m.gguf"
    convert_base(folder, out, outtype="f32", progress=False)
    assert read_gguf(out, with_tokens=False).metadata["tokenizer.ggml.model"] == "llama"
    tokenizer = _tokenizer(folder)
    texts = LLAMA_CPP_STRINGS + SPM_SPECIALS
    assert [t for t in texts if llama_tokens(out, t) != tokenizer(t, add_special_tokens=False)["input_ids"]] == []
