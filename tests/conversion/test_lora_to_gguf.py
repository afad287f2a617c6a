"""Adapter conversion: metadata and names llama.cpp expects, every output type, and clear refusals."""

from __future__ import annotations

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from conversion.architecture import layout_for
from conversion.hf_to_gguf import convert_base
from conversion.lora_to_gguf import convert_lora
from core.errors import ScalpelError
from tests.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def base_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny-f32.gguf"
    convert_base(tiny_llama, out, outtype="f32", progress=False)
    return out


def save_adapter(base_dir, out_dir, **lora_kwargs):
    torch.manual_seed(0)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"], "init_lora_weights": False}
    kwargs.update(lora_kwargs)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**kwargs))
    model.save_pretrained(out_dir)
    return out_dir


def test_metadata_and_tensor_names(tiny_llama, base_gguf, tmp_path):
    adapter = save_adapter(tiny_llama, tmp_path / "peft")
    result = convert_lora(adapter, layout_for(base_gguf), tmp_path / "a.gguf")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert fields["general.architecture"] == "llama"
    names = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert names["blk.0.attn_q.weight.lora_a"] == (64, 4)  # ne: [in, r]
    assert names["blk.0.attn_q.weight.lora_b"] == (4, 64)  # ne: [r, out]
    assert names["blk.1.attn_k.weight.lora_b"] == (4, 32)  # 2 kv heads x 16
    assert len(names) == 2 * 3 * 2 and result.n_modules == 6


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_every_outtype_loads_in_llama_cpp(tiny_llama, base_gguf, tmp_path, outtype):
    adapter = save_adapter(tiny_llama, tmp_path / "peft")
    out = tmp_path / f"a-{outtype}.gguf"
    convert_lora(adapter, layout_for(base_gguf), out, outtype=outtype)
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(out), n_ctx=32, logits_all=True, verbose=False)
    llm.eval([5, 6, 7, 8])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()


def test_hf_base_and_gguf_base_give_the_same_adapter(tiny_llama, base_gguf, tmp_path):
    adapter = save_adapter(tiny_llama, tmp_path / "peft")
    convert_lora(adapter, layout_for(base_gguf), tmp_path / "from-gguf.gguf")
    convert_lora(adapter, layout_for(tiny_llama), tmp_path / "from-hf.gguf")
    a, b = gguf.GGUFReader(tmp_path / "from-gguf.gguf"), gguf.GGUFReader(tmp_path / "from-hf.gguf")
    for ta, tb in zip(a.tensors, b.tensors, strict=False):
        assert ta.name == tb.name and np.array_equal(ta.data, tb.data)


@pytest.mark.parametrize(
    "lora_kwargs, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["embed_tokens"]}, "embeddings"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_inexpressible_adapters_are_refused(tiny_llama, base_gguf, tmp_path, lora_kwargs, message):
    adapter = save_adapter(tiny_llama, tmp_path / "peft", **lora_kwargs)
    with pytest.raises(ScalpelError, match=message):
        convert_lora(adapter, layout_for(base_gguf), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    other = build_tiny_llama(tmp_path / "other", hidden=32, n_head=2, n_head_kv=1)
    adapter = save_adapter(tiny_llama, tmp_path / "peft")
    with pytest.raises(ScalpelError, match="different base") as err:
        convert_lora(adapter, layout_for(other), tmp_path / "a.gguf")
    assert err.value.code == "base_mismatch"


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_base_outtypes_stay_close_to_pytorch(tiny_llama, tmp_path, outtype):
    out = tmp_path / f"tiny-{outtype}.gguf"
    convert_base(tiny_llama, out, outtype=outtype, progress=False)
    tokens = list(range(5, 37))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)])
    llm.close()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    assert np.abs(got - expected).max() < 0.1
