"""`scalpel export vllm`: the PEFT folder, the HF base and the vLLM command for a stored version."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from core import adapter_store
from core.errors import ScalpelError
from scalpel.cli.main import main
from scalpel.export import export_vllm, max_lora_rank
from scalpel.publish import train_and_publish
from tests.tiny_models import registered_home
from training.config import parse_config

FACTS = [{"instruction": f"What is fact {i}?", "output": f"Fact {i} is FOR TWO."} for i in range(4)]


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("export"), tiny_llama) as home:
        data = home / "facts.json"
        data.write_text(json.dumps(FACTS))
        config = {
            "model_name": "tiny",
            "output_dir": "adapters/facts",
            "lora_config": {"r": 4, "lora_alpha": 8},
            "training_config": {"num_epochs": 2, "batch_size": 2, "learning_rate": 5e-2, "save_steps": 1000},
        }
        train_and_publish(parse_config(config), data, progress=False)
        yield home


def _logits(base: str, adapter_dir) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13, 2]])).logits


def test_the_copied_folder_is_the_version_vllm_would_load(store, tiny_llama, tmp_path):
    export = export_vllm("facts@v1", tmp_path / "out")
    assert export.adapter_dir == (tmp_path / "out" / "facts-v1").resolve()
    assert export.base_model == str(tiny_llama)  # a base registered from an HF folder is served from it
    config = json.loads((export.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert sorted(p.name for p in export.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    stored = adapter_store.resolve("facts@v1").path
    exported, original = _logits(str(tiny_llama), export.adapter_dir), _logits(str(tiny_llama), stored)
    assert torch.equal(exported, original)
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_llama))(torch.tensor([[1, 5, 9, 13, 2]])).logits
    assert not torch.allclose(exported, bare.detach(), atol=1e-4)  # the trained LoRA is in it
    with pytest.raises(ScalpelError, match="already exists"):
        export_vllm("facts@v1", tmp_path / "out")


def test_without_out_it_points_at_the_store_and_keeps_the_clients_name(store):
    export = export_vllm("facts")
    assert export.adapter_dir == adapter_store.resolve("facts").path and export.ref == "facts@v1"
    command = export.serve_command()
    assert command[:3] == ["vllm", "serve", export.base_model] and "--enable-lora" in command
    assert command[command.index("--host") + 1] == "127.0.0.1"
    modules = json.loads(command[command.index("--lora-modules") + 1])
    assert modules == {"name": "facts", "path": str(export.adapter_dir), "base_model_name": export.base_model}
    assert command[command.index("--max-lora-rank") + 1] == "8"  # r=4, and vLLM's smallest rank is 8
    assert export.load_request() == {"lora_name": "facts", "lora_path": str(export.adapter_dir)}


def test_the_cli_prints_a_command_that_parses(store, capsys):
    assert main(["export", "vllm", "facts@v1", "--base-model", "org/tiny-hf"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vllm serve")]
    argv = shlex.split(lines[0])
    assert argv[2] == "org/tiny-hf" and json.loads(argv[argv.index("--lora-modules") + 1])["name"] == "facts@v1"
    assert main(["export", "vllm", "facts@v1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ref"] == "facts@v1"


def test_bad_references_and_gguf_only_versions_are_refused_by_name(store, tmp_path, capsys):
    assert main(["export", "vllm", "nope"]) == 2
    assert "'nope' is not in the store" in capsys.readouterr().err
    assert main(["export", "vllm", "facts@v7"]) == 2
    assert "no version 'v7'" in capsys.readouterr().err
    gguf = tmp_path / "lora.gguf"
    gguf.write_bytes(adapter_store.resolve("facts@v1").gguf.read_bytes())
    assert main(["adapters", "import", "gguf_only", str(gguf), "--base", "tiny"]) == 0
    capsys.readouterr()
    with pytest.raises(ScalpelError, match="no PEFT folder") as caught:
        export_vllm("gguf_only")
    assert caught.value.code == "no_peft_weights"


def test_ranks_round_up_to_what_vllm_accepts():
    assert [max_lora_rank(r) for r in (1, 8, 9, 16, 33, 512)] == [8, 8, 16, 16, 64, 512]
    with pytest.raises(ScalpelError, match="largest LoRA rank"):
        max_lora_rank(1024)


def test_a_gguf_base_without_a_known_hf_id_asks_for_base_model(store, capsys):
    from core import model_store

    tiny = model_store.get("tiny")
    assert main(["models", "add", "tiny_gguf", tiny.gguf]) == 0  # the same weights, registered as a bare GGUF
    assert (
        main(["adapters", "import", "on_gguf", str(adapter_store.resolve("facts@v1").path), "--base", "tiny_gguf"]) == 0
    )
    capsys.readouterr()
    assert main(["export", "vllm", "on_gguf"]) == 2
    assert "pass --base-model" in capsys.readouterr().err
    assert export_vllm("on_gguf", base_model="org/tiny").base_model == "org/tiny"
