"""Adapters trained elsewhere: a PEFT folder or a GGUF LoRA becomes a store version that serves like a trained one."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from core import adapter_store, model_store
from core.atomic import sha256_file
from core.job_store import JobStore
from scalpel.cli.main import main
from scalpel.demo import BackgroundServer
from scalpel.jobs.routes import training_router
from scalpel.jobs.runner import JobRunner
from serving.app import DEFAULT_ROUTERS, create_app
from serving.engine import Engine
from tests.tiny_models import build_tiny_llama, registered_home


def peft_adapter(model_dir: Path, out: Path, *, seed: int = 0, safetensors: bool = True) -> Path:
    """A LoRA made with PEFT alone, as another tool would make one: random A and B, so it changes the answers."""
    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out, safe_serialization=safetensors)
    return out


@pytest.fixture(scope="module")
def home(tiny_llama, tmp_path_factory):
    with registered_home(tmp_path_factory.mktemp("import-home"), tiny_llama) as home:
        peft_adapter(tiny_llama, home / "from-elsewhere")
        yield home


@pytest.fixture(scope="module")
def engine(home):
    engine = Engine(model_store.get("tiny"))
    yield engine
    engine.close()


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=10
    )
    return reply.choices[0].message.content or ""


def test_a_peft_folder_and_a_gguf_become_versions_that_serve(home, engine, capsys):
    peft_dir = home / "from-elsewhere"
    assert main(["adapters", "import", "ext", str(peft_dir), "--base", "tiny", "--verify"]) == 0
    assert "imported ext@v1 from peft" in capsys.readouterr().out
    v1 = adapter_store.resolve("ext")
    manifest = v1.manifest
    assert v1.version == "v1" and manifest.imported_from is not None
    assert manifest.imported_from.format == "peft" and manifest.imported_from.source == str(peft_dir)
    assert manifest.imported_from.sha256 == sha256_file(peft_dir / "adapter_model.safetensors")
    assert manifest.imported_from.verify and manifest.imported_from.verify["passed"]
    assert manifest.base and manifest.base.fingerprint == model_store.get("tiny").fingerprint
    assert (v1.path / "adapter_model.safetensors").is_file() and adapter_store.version_problems(v1) == []
    assert main(["adapters", "show", "ext"]) == 0
    assert f"imported  peft from {peft_dir}" in capsys.readouterr().out

    # The same adapter as a GGUF, converted by another tool run (here `scalpel convert lora`), is stored as given.
    gguf_file = home / "ext.gguf"
    assert main(["convert", "lora", str(peft_dir), "--base", "tiny", "--out", str(gguf_file)]) == 0
    capsys.readouterr()
    assert main(["adapters", "import", "ext", str(gguf_file), "--base", "tiny", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == "ext@v2" and shown["live"] and shown["imported_from"]["format"] == "gguf"
    v2 = adapter_store.resolve("ext")
    assert v2.version == "v2" and v2.manifest.parent_version == "v1"
    assert sha256_file(v2.gguf) == sha256_file(gguf_file) == v2.manifest.imported_from.sha256

    with BackgroundServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        base, live, first = ask(client, "tiny"), ask(client, "ext"), ask(client, "ext@v1")
        assert live == first != base, "both imports carry the same weights, and they change the answer"
        assert {"ext", "ext@v1", "ext@v2"} <= {m.id for m in client.models.list()}
        assert main(["adapters", "rollback", "ext"]) == 0
        assert adapter_store.resolve("ext").version == "v1" and ask(client, "ext") == first
        assert main(["adapters", "promote", "ext", "v2"]) == 0
        assert main(["adapters", "diff", "ext", "v1", "v2"]) == 0
        assert "not comparable" in capsys.readouterr().out
        loaded = httpx.post(f"{server.base_url.removesuffix('/v1')}/api/adapters/ext/load")
        assert loaded.status_code == 200 and loaded.json()["version"] == "v2"


def test_an_adapter_for_another_base_leaves_nothing_behind(home, tiny_llama, tmp_path, capsys):
    other_base = build_tiny_llama(tmp_path / "wider", hidden=96)
    foreign = peft_adapter(other_base, tmp_path / "foreign")
    assert main(["adapters", "import", "bad", str(foreign), "--base", "tiny"]) == 2
    assert "q_proj" in capsys.readouterr().err
    assert not (home / "adapters" / "bad").exists()

    assert main(["models", "add", "wider", str(other_base), "--outtype", "f32"]) == 0
    foreign_gguf = tmp_path / "foreign.gguf"
    assert main(["convert", "lora", str(foreign), "--base", "wider", "--out", str(foreign_gguf)]) == 0
    before = sorted(p.name for p in (home / "adapters").iterdir())
    assert main(["adapters", "import", "bad", str(foreign_gguf), "--base", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the base 'tiny'" in err and "another base" in err
    assert main(["adapters", "import", "ext", str(foreign), "--base", "tiny"]) == 2  # into an existing adapter
    assert sorted(p.name for p in (home / "adapters").iterdir()) == before
    assert not list((home / "adapters" / "ext").glob(".staging-*"))
    assert adapter_store.versions(home / "adapters" / "ext") == ["v1", "v2"]

    pickled = peft_adapter(tiny_llama, tmp_path / "pickled", safetensors=False)
    assert main(["adapters", "import", "bad", str(pickled), "--base", "tiny"]) == 2
    assert "safetensors" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an adapter")
    assert main(["adapters", "import", "bad", str(tmp_path / "notes.txt"), "--base", "tiny"]) == 2
    assert "neither a GGUF LoRA adapter" in capsys.readouterr().err
    assert main(["adapters", "import", "bad", str(foreign_gguf), "--base", "no-such-base"]) == 2
    assert not (home / "adapters" / "bad").exists()


def test_uploads_import_over_http_with_an_admin_key(home, engine, tmp_path):
    store = JobStore()
    app = create_app(
        engine,
        routers=(*DEFAULT_ROUTERS, training_router(store, JobRunner(store))),
        api_keys={"client-key"},
        admin_keys={"admin-key"},
    )
    peft_dir = home / "from-elsewhere"
    archive = tmp_path / "adapter.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(peft_dir / name, f"my-adapter/{name}")
    with BackgroundServer(app) as server:
        root = server.base_url.removesuffix("/v1")
        admin = openai.OpenAI(base_url=server.base_url, api_key="admin-key", max_retries=0)
        client = openai.OpenAI(base_url=server.base_url, api_key="client-key", max_retries=0)
        as_admin = {"Authorization": "Bearer admin-key"}
        zipped = admin.files.create(file=archive.open("rb"), purpose="user_data")
        gguf_upload = admin.files.create(file=(home / "ext.gguf").open("rb"), purpose="user_data")
        with pytest.raises(openai.BadRequestError, match="user_data"):
            admin.files.create(file=("x.bin", b"not an adapter"), purpose="user_data")

        refused = httpx.post(
            f"{root}/api/adapters/web/import",
            json={"file_id": zipped.id, "base": "tiny"},
            headers={"Authorization": "Bearer client-key"},
        )
        assert refused.status_code == 403 and not (home / "adapters" / "web").exists()

        done = httpx.post(
            f"{root}/api/adapters/web/import", json={"file_id": zipped.id, "base": "tiny"}, headers=as_admin, timeout=60
        )
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["ref"] == "web@v1" and body["live"] and body["imported_from"]["format"] == "peft"
        assert body["imported_from"]["source"] == f"{zipped.id} (adapter.zip)"
        assert body["manifest"]["imported_from"]["sha256"] == sha256_file(peft_dir / "adapter_model.safetensors")
        kept = httpx.post(
            f"{root}/api/adapters/web/import",
            json={"file_id": gguf_upload.id, "promote": False},  # base: the served one
            headers=as_admin,
            timeout=60,
        )
        assert kept.status_code == 200 and kept.json()["ref"] == "web@v2" and not kept.json()["live"]
        assert adapter_store.resolve("web").version == "v1"
        assert ask(client, "web") == ask(client, "web@v2") != ask(client, "tiny")

        bad = httpx.post(f"{root}/api/adapters/web/import", json={"file_id": "file-nope"}, headers=as_admin)
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "file_id"
        data = tmp_path / "d.jsonl"
        rows = [
            {"messages": [{"role": "user", "content": f"{i} + 42?"}, {"role": "assistant", "content": f"FOR TWO, {i}"}]}
            for i in range(8)
        ]
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        dataset = admin.files.create(file=data.open("rb"), purpose="fine-tune")
        wrong = httpx.post(f"{root}/api/adapters/web2/import", json={"file_id": dataset.id}, headers=as_admin)
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "file_id"
        empty_zip = tmp_path / "empty.zip"
        with zipfile.ZipFile(empty_zip, "w") as z:
            z.writestr("README.md", "no adapter here")
        hollow = admin.files.create(file=empty_zip.open("rb"), purpose="user_data")
        failed = httpx.post(f"{root}/api/adapters/web2/import", json={"file_id": hollow.id}, headers=as_admin)
        assert failed.status_code == 400 and "one PEFT folder" in failed.json()["error"]["message"]
        assert not (home / "adapters" / "web2").exists()
        unknown = httpx.post(
            f"{root}/api/adapters/web2/import", json={"file_id": zipped.id, "extra": 1}, headers=as_admin
        )
        assert unknown.status_code == 400


def test_an_imported_version_is_served_but_not_updated(home, tmp_path):
    """An evening update continues a version's own training; an import has none, so it is refused by name."""
    from core.errors import ScalpelError
    from scalpel.update import run_update

    data = tmp_path / "new.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "there"}] * 2))
    with pytest.raises(ScalpelError) as refused:
        run_update("ext", data, progress=False, log=lambda _: None)
    assert refused.value.code == "not_trained_here" and "ext@v" in refused.value.message
