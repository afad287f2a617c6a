"""Benchmark conversion: adapter conversion time for CodeLlama-7B-shaped LoRAs (surgical and nuclear), and base
conversion throughput and peak memory for a ~1B-parameter synthetic model, against a plain file copy in the same run.

    .venv/bin/python bench/conversion.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINYLLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def _in_child(fn, *args):
    """Run fn in a fresh process; return (result, seconds, peak RSS in MB of that process)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (fn, *args))


def _measure(fn, *args):
    import torch  # noqa: F401  (imports are not conversion time)

    started = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - started
    return result, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_peft_adapter(folder: Path, config: dict, r: int, modules: list[str]) -> Path:
    import torch
    from safetensors.torch import save_file

    from conversion.architecture import layout_from_hf_config
    from conversion.estimate import MODULE_TENSORS

    layout = layout_from_hf_config(config)
    parents = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    tensors = {}
    for i in range(layout.n_layers):
        for m in modules:
            out_f, in_f = layout.shapes[f"blk.{i}.{MODULE_TENSORS[m]}.weight"]
            key = f"base_model.model.model.layers.{i}.{parents[m]}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": modules, "task_type": "CAUSAL_LM"}
        )
    )
    return folder


def convert_adapter(folder: str, config: dict, out: str) -> int:
    from conversion.architecture import layout_from_hf_config
    from conversion.lora_to_gguf import convert_lora

    return convert_lora(Path(folder), layout_from_hf_config(config), Path(out)).n_bytes


def make_base(folder: Path, config: dict) -> int:
    """Random f16 weights, written one tensor file at a time (sharded) so the generator stays small."""
    from safetensors.numpy import save_file

    from tests.tiny_models import build_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name))
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.nbytes

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": mat(v, h),
            "lm_head.weight": mat(v, h),
            "model.norm.weight": np.ones(h, np.float16),
        },
    )
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shard(
            f"layer-{i:02d}.safetensors",
            {
                f"{p}.self_attn.q_proj.weight": mat(h, h),
                f"{p}.self_attn.k_proj.weight": mat(kv, h),
                f"{p}.self_attn.v_proj.weight": mat(kv, h),
                f"{p}.self_attn.o_proj.weight": mat(h, h),
                f"{p}.mlp.gate_proj.weight": mat(f, h),
                f"{p}.mlp.up_proj.weight": mat(f, h),
                f"{p}.mlp.down_proj.weight": mat(h, f),
                f"{p}.input_layernorm.weight": np.ones(h, np.float16),
                f"{p}.post_attention_layernorm.weight": np.ones(h, np.float16),
            },
        )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    build_bpe_tokenizer().save_pretrained(folder)
    return total


def convert_base_f16(folder: str, out: str) -> int:
    from conversion.hf_to_gguf import convert_base

    return convert_base(Path(folder), Path(out), outtype="f16", progress=False).n_bytes


def copy_files(folder: str, out: str) -> int:
    total = 0
    Path(out).mkdir(exist_ok=True)
    for f in sorted(Path(folder).glob("*.safetensors")):
        shutil.copyfile(f, Path(out) / f.name)
        total += f.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    codellama = json.loads((ROOT / "conversion" / "profiles" / "codellama-7b-instruct.json").read_text())
    results: dict = {"adapters": {}, "base": {}}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        for label, r, modules in (
            ("surgical r=8 q/k/v", 8, ["q_proj", "k_proj", "v_proj"]),
            (
                "nuclear r=32 7 modules",
                32,
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        ):
            peft_dir = make_peft_adapter(tmp / label.split()[0], codellama, r, modules)
            n_bytes, seconds, rss = _in_child(convert_adapter, str(peft_dir), codellama, str(tmp / "a.gguf"))
            results["adapters"][label] = {
                "seconds": round(seconds, 3),
                "gguf_mb": round(n_bytes / 1e6, 1),
                "peak_rss_mb": round(rss),
                "target_seconds": 2.0,
                "meets_target": seconds < 2.0,
            }
            print(f"adapter {label:24} {seconds:6.2f} s  {n_bytes / 1e6:7.1f} MB  peak RSS {rss:6.0f} MB")

        size = make_base(tmp / "base-1b", TINYLLAMA_1B)
        copied, copy_s, copy_rss = _in_child(copy_files, str(tmp / "base-1b"), str(tmp / "copy"))
        shutil.rmtree(tmp / "copy")
        _, conv_s, conv_rss = _in_child(convert_base_f16, str(tmp / "base-1b"), str(tmp / "base-1b.gguf"))
        results["base"] = {
            "model_mb": round(size / 1e6),
            "convert_seconds": round(conv_s, 1),
            "convert_mb_per_s": round(size / 1e6 / conv_s, 1),
            "convert_peak_rss_mb": round(conv_rss),
            "copy_mb_per_s": round(copied / 1e6 / copy_s, 1),
            "throughput_vs_copy": round(copy_s / conv_s, 3),
            "peak_rss_over_model_size": round(conv_rss / (size / 1e6), 3),
        }
        print(
            f"base 1.1B f16 -> GGUF f16: {size / 1e6:.0f} MB in {conv_s:.1f} s = {size / 1e6 / conv_s:.0f} MB/s "
            f"({results['base']['throughput_vs_copy']:.2f}x a plain copy at {copied / 1e6 / copy_s:.0f} MB/s), "
            f"peak RSS {conv_rss:.0f} MB = {results['base']['peak_rss_over_model_size']:.2f}x the model"
        )
    (out_dir / "conversion.json").write_text(json.dumps(results, indent=2))
    print(f"written to {out_dir / 'conversion.json'}")


if __name__ == "__main__":
    main()
