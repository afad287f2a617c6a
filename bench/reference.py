"""Our converters against llama.cpp's own (the pinned llama-cpp-python sdist's convert_hf_to_gguf.py and
convert_lora_to_gguf.py) on each tiny architecture: tokens on llama.cpp's test strings, and f32 logits of
the base and of base + LoRA. tests/conversion/test_reference.py asserts on it; this prints the table.

    .venv/bin/python bench/reference.py [--out bench/results/reference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.llama_build import LLAMA_CPP_PYTHON_VERSION as LLAMA_CPP_PYTHON  # noqa: E402 - its sdist vendors llama.cpp

CACHE = Path(os.environ.get("SCALPEL_CACHE", Path.home() / ".cache" / "scalpel")) / "src"


def find_reference() -> tuple[Path | None, str]:
    """The vendored llama.cpp folder of the pinned sdist: from the cache, else fetched with pip download.
    Returns (folder, "") or (None, why not)."""
    folder = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        done = subprocess.run(
            [*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True, timeout=600
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            return None, f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed: {done.stderr.strip()[-300:]}"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]  # no links, devices
            if any(m.name.startswith(("/", "..")) or "/../" in m.name for m in members):
                return None, f"{sdists[0].name} has paths outside its folder; not unpacked"
            tar.extractall(CACHE, members=members)  # noqa: S202 - members checked above
    if not (folder / "convert_hf_to_gguf.py").is_file():
        return None, f"the sdist has no {folder.relative_to(CACHE)}/convert_hf_to_gguf.py"
    return folder, ""


# Run a reference script, first telling it the BPE pre-tokenizer's name: it recognises pre-tokenizers by
# the hash of a test text's tokens in a table of published models, which a tiny trained vocabulary is not in.
_WITH_PRE = """
import runpy, sys
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_reference(reference: Path, script: str, args: list[str], pre: str | None = None) -> None:
    """One of llama.cpp's converter scripts, with its own gguf-py, in a subprocess (its `conversion`
    package would shadow ours in this process)."""
    env = {**os.environ, "PYTHONPATH": str(reference / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    path = str(reference / script)
    command = [path, *args] if pre is None else ["-c", _WITH_PRE.format(pre=pre, argv=[path, *args], script=path)]
    done = subprocess.run(
        [sys.executable, *command],
        cwd=reference,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-2000:]}")


@dataclass
class Row:
    architecture: str
    tokenizer: str
    strings: int
    tokens_agree: int  # strings on which our GGUF and llama.cpp's tokenize identically
    tokens_agree_hf: int  # ... and on which our GGUF and transformers (as training uses it) agree
    reference_agree_hf: int  # ... and on which llama.cpp's GGUF and transformers agree
    base_max_abs: float  # ours vs llama.cpp's GGUF, f32 logits
    base_vs_torch: float  # ours vs PyTorch
    lora_max_abs: float  # our base + our LoRA vs llama.cpp's base + llama.cpp's LoRA
    lora_vs_torch: float  # ours vs PEFT in PyTorch
    differ: list[str]  # the strings our GGUF and llama.cpp's tokenize differently


def _strings(kind: str) -> list[str]:
    from tests.conversion.test_architectures import BPE_SPECIALS, SPM_SPECIALS
    from tests.conversion.test_tokenizer import LLAMA_CPP_STRINGS

    return LLAMA_CPP_STRINGS + (SPM_SPECIALS if "SentencePiece" in kind else BPE_SPECIALS)


def compare(name: str, reference: Path, work: Path) -> Row:
    """Build the tiny model `name`, convert it (and a random LoRA) with both converters, and compare."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.architecture import layout_for
    from conversion.hf_to_gguf import convert_base
    from conversion.lora_to_gguf import convert_lora
    from conversion.verify import llama_cpp_logits, torch_logits
    from tests.conversion.test_tokenizer import llama_tokens
    from tests.tiny_models import ARCHITECTURES
    from training.base_model import match_llama_cpp_spm

    builder, kind = ARCHITECTURES[name]
    folder = builder(work / "model")
    ours, theirs = work / "ours.gguf", work / "theirs.gguf"
    convert_base(folder, ours, outtype="f32", progress=False)
    pre = kind.rsplit(", ", 1)[1] if kind.startswith("byte-level BPE") else None
    args = [str(folder), "--outfile", str(theirs), "--outtype", "f32"]
    run_reference(reference, "convert_hf_to_gguf.py", args, pre)

    hf = match_llama_cpp_spm(AutoTokenizer.from_pretrained(folder))
    strings = _strings(kind)
    got = {t: llama_tokens(ours, t) for t in strings}
    ref = {t: llama_tokens(theirs, t) for t in strings}
    want = {t: hf(t, add_special_tokens=False)["input_ids"] for t in strings}

    vocab = AutoModelForCausalLM.from_pretrained(folder).config.vocab_size
    prompt = [int(t) for t in np.random.default_rng(7).integers(3, vocab, size=32)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base_ours = llama_cpp_logits(ours, [prompt])[0]
    base_theirs = llama_cpp_logits(theirs, [prompt])[0]
    base_torch = torch_logits(model, [prompt])[0]

    torch.manual_seed(3)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(work / "peft")
    lora_torch = torch_logits(peft_model, [prompt])[0]
    ours_lora, theirs_lora = work / "ours-lora.gguf", work / "theirs-lora.gguf"
    convert_lora(work / "peft", layout_for(ours), ours_lora, outtype="f32")
    args = [str(work / "peft"), "--base", str(folder), "--outfile", str(theirs_lora), "--outtype", "f32"]
    run_reference(reference, "convert_lora_to_gguf.py", args)
    lora_ours = llama_cpp_logits(ours, [prompt], ours_lora)[0]
    lora_theirs = llama_cpp_logits(theirs, [prompt], theirs_lora)[0]
    return Row(
        architecture=name,
        tokenizer=kind,
        strings=len(strings),
        tokens_agree=sum(got[t] == ref[t] for t in strings),
        tokens_agree_hf=sum(got[t] == want[t] for t in strings),
        reference_agree_hf=sum(ref[t] == want[t] for t in strings),
        base_max_abs=float(np.abs(base_ours - base_theirs).max()),
        base_vs_torch=float(np.abs(base_ours - base_torch).max()),
        lora_max_abs=float(np.abs(lora_ours - lora_theirs).max()),
        lora_vs_torch=float(np.abs(lora_ours - lora_torch).max()),
        differ=[t for t in strings if got[t] != ref[t]],
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| architecture | tokenizer | max abs logit diff vs llama.cpp's GGUF (base / LoRA) | vs PyTorch (base / LoRA) "
        "| tokens = llama.cpp's GGUF | tokens = transformers (ours / llama.cpp's) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.architecture} | {r.tokenizer} | {r.base_max_abs:.1e} / {r.lora_max_abs:.1e} "
            f"| {r.base_vs_torch:.1e} / {r.lora_vs_torch:.1e} | {r.tokens_agree}/{r.strings} "
            f"| {r.tokens_agree_hf}/{r.strings} / {r.reference_agree_hf}/{r.strings} |"
        )
    return "\n".join(lines)


def main() -> None:
    from tests.tiny_models import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args()
    reference, why = find_reference()
    if reference is None:
        sys.exit(why)
    rows = []
    for name in ARCHITECTURES:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(compare(name, reference, Path(tmp)))
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
