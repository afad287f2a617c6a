"""`scalpel convert`, `verify`, `inspect` and `estimate`: the GGUF conversion toolkit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conversion.quantize import LLAMA_QUANTS
from conversion.tensor_types import OUTTYPES
from core.errors import ScalpelError
from scalpel.cli import convert_compat as compat


def cmd_convert_lora(args) -> None:
    from conversion.architecture import layout_for
    from conversion.lora_to_gguf import convert_lora
    from core import model_store
    from core.gguf_meta import BASE_FINGERPRINT_KEY

    compat.check_refused(args)
    args.base = compat.resolve_lora_base(Path(args.adapter), args.base, args.base_model_id)
    metadata = {}
    if Path(args.base).exists():
        layout = layout_for(Path(args.base))
    else:
        entry = model_store.get(args.base)
        layout, metadata = layout_for(entry.gguf_path), {BASE_FINGERPRINT_KEY: entry.fingerprint}
    outtype = compat.auto_outtype(Path(args.adapter)) if args.outtype == "auto" else args.outtype
    out = compat.outfile(args.out, Path(args.adapter) / "adapter.gguf", outtype)
    result = convert_lora(Path(args.adapter), layout, out, outtype=outtype, metadata=metadata, dry_run=args.dry_run)
    print(
        f"{'dry run: would write' if args.dry_run else 'wrote'} {result.path} ({result.n_modules} modules, "
        f"rank {result.rank}, alpha {result.alpha:g}, {result.n_bytes / 1e6:.2f} MB)"
    )
    if args.dry_run:
        return
    if args.verify:
        if Path(args.base).exists():
            raise ScalpelError(
                "--verify needs a registered base (scalpel models add), so that both its "
                "PyTorch weights and its GGUF are known",
                param="base",
            )
        from conversion.verify import verify
        from training.base_model import load_model, load_tokenizer

        report = verify(
            load_model(entry),
            load_tokenizer(entry),
            entry.gguf_path,
            peft_dir=Path(args.adapter),
            adapter_gguf=out,
            progress=True,
        )
        _report_verify(report, False)


def cmd_convert_base(args) -> None:
    from conversion.hf_to_gguf import convert_to, plan_base

    compat.check_refused(args)
    source = Path(args.source)
    outtype = compat.auto_outtype(source) if args.outtype == "auto" else args.outtype
    out = compat.outfile(args.out, source / f"model-{outtype}.gguf", outtype)
    if args.dry_run:
        plan = plan_base(source, outtype if outtype in OUTTYPES else "f16")
        print(
            f"dry run: would write {out} ({plan.layout.arch_name}, {len(plan.tensors) + len(plan.extra)} tensors, "
            f"{outtype}{', vocabulary only' if args.vocab_only else ''}); nothing written"
        )
        return
    path = convert_to(source, out, outtype, vocab_only=args.vocab_only, name=args.model_name)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.vocab_only:
        return
    if args.verify:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from conversion.verify import verify
        from training.base_model import match_llama_cpp_spm

        model = AutoModelForCausalLM.from_pretrained(args.source, dtype="float32", use_safetensors=True)
        report = verify(model, match_llama_cpp_spm(AutoTokenizer.from_pretrained(args.source)), path, progress=True)
        _report_verify(report, args.json)


def _report_verify(report, as_json: bool) -> None:
    """Print a verify report; a failed one is an error (exit status 2)."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"verify {report.file_type}{' + adapter' if report.adapter else ''}: {report.positions} positions, "
            f"max abs {report.max_abs:.3g}, mean abs {report.mean_abs:.3g}, top-1 agreement {report.top1:.1%} "
            f"(on the {report.decided_positions} decided positions: {report.top1_decided:.1%}) "
            f"[{report.criterion}: {'PASS' if report.passed else 'FAIL'}]"
        )
    if not report.passed:
        raise ScalpelError(f"verification failed: {report.criterion} not met", code="verify_failed")


def cmd_verify(args) -> None:
    from conversion.verify import verify
    from core import adapter_store, model_store
    from training.base_model import load_model, load_tokenizer

    entry = model_store.get(args.base)
    peft_dir = adapter_gguf = None
    if args.adapter:
        if Path(args.adapter).is_dir():
            peft_dir = Path(args.adapter)
        else:
            version = adapter_store.resolve(args.adapter)
            peft_dir, adapter_gguf = version.path, version.gguf
    report = verify(
        load_model(entry),
        load_tokenizer(entry),
        entry.gguf_path,
        peft_dir=peft_dir,
        adapter_gguf=adapter_gguf,
        min_top1=args.min_top1,
        progress=True,
    )
    _report_verify(report, args.json)


def cmd_inspect(args) -> None:
    from conversion.architecture import layout_for
    from conversion.inspect_gguf import check_adapter, summarize, tensor_table
    from core import model_store
    from core.gguf_meta import read_gguf

    info = read_gguf(Path(args.file))
    summary = summarize(info)
    compat = None
    if args.base:
        fingerprint = None
        if Path(args.base).exists():
            layout = layout_for(Path(args.base))
        else:
            entry = model_store.get(args.base)
            layout, fingerprint = layout_for(entry.gguf_path), entry.fingerprint
        compat = check_adapter(info, layout, fingerprint)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": summary,
                    "metadata": info.metadata,
                    "tensors": [
                        dict(zip(("name", "type", "shape", "mb"), row, strict=True)) for row in tensor_table(info)
                    ],
                    "compatibility": vars(compat) if compat else None,
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(
            f"{summary['file']}: GGUF {summary['type']}, {summary['architecture']}, "
            f"{summary['tensors']} tensors, {summary['size_mb']:.2f} MB"
        )
        for key, value in info.metadata.items():
            text = repr(value)
            print(f"  {key:42} {text[:90] + '...' if len(text) > 90 else text}")
        print(
            f"  {'tensor types':42} "
            + ", ".join(f"{k}: {v['tensors']} ({v['mb']:.1f} MB)" for k, v in summary["tensor_types"].items())
        )
        rows = tensor_table(info, None if args.all else 12)
        for name, type_name, shape, mb in rows:
            print(f"    {name:40} {type_name:6} {shape:>14} {mb:9.3f} MB")
        if len(rows) < summary["tensors"]:
            print(f"    ... {summary['tensors'] - len(rows)} more (--all)")
        if compat:
            print(f"compatible with {args.base}: {'yes' if compat.compatible else 'NO'}")
            for problem in compat.problems:
                print(f"  - {problem}")
    if compat and not compat.compatible:
        raise ScalpelError(f"{args.file} does not fit {args.base}", code="base_mismatch")


def cmd_estimate(args) -> None:
    from conversion.estimate import NUCLEAR, load_profile, lora_size, memory
    from training.config import load_config

    config, layout = load_profile(args.base)
    lora = load_config(Path(args.config)).lora_config if args.config else None
    r, modules = (lora.r, list(lora.target_modules)) if lora else (8, ["q_proj", "k_proj", "v_proj"])
    surgical = lora_size(layout, r, modules)
    nuclear = lora_size(layout, NUCLEAR["r"], NUCLEAR["target_modules"])
    mem = memory(layout, config, surgical, seq=args.seq, base_type=args.base_type) if "gguf" not in config else None
    result = {
        "base": args.base,
        "layers": layout.n_layers,
        "adapter": vars(surgical),
        "nuclear": vars(nuclear),
        "nuclear_over_adapter": nuclear.params / surgical.params,
        "memory": vars(mem) if mem else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"base {args.base}: {layout.arch_name}, {layout.n_layers} layers")
    for label, est in (("this adapter", surgical), ("nuclear (r=32, 7 modules)", nuclear)):
        sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in est.size_mb.items())
        print(f"  {label:27} r={est.r:<3} {'/'.join(est.target_modules)}: {est.params:,} params; {sizes}")
    print(f"  nuclear is {result['nuclear_over_adapter']:.1f}x the size of this adapter")
    if mem:
        print(
            f"  base parameters {mem.base_params / 1e9:.2f} B; train ~{mem.train_gb:.1f} GB, "
            f"serve ~{mem.serve_gb:.2f} GB"
        )
        for note in mem.notes:
            print(f"    ({note})")


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    convert = sub.add_parser("convert", help="GGUF conversion").add_subparsers(dest="what", required=True)
    lora = convert.add_parser("lora", help="PEFT adapter folder -> GGUF LoRA adapter")
    lora.add_argument("adapter")
    lora.add_argument(
        "--base", help="registered base name, base GGUF file, or HF folder (default: the adapter config's base)"
    )
    lora.add_argument("--base-model-id", help="the base's Hugging Face id, from the local cache only")
    lora.add_argument("--out", "--outfile", dest="out", help="output path ({ftype} is replaced by the outtype)")
    lora.add_argument("--outtype", choices=[*OUTTYPES, "auto"], default="f32")
    lora.add_argument("--dry-run", action="store_true", help="check the adapter against the base; write nothing")
    lora.add_argument("--verify", action="store_true", help="compare with PEFT in PyTorch afterwards")
    lora.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    compat.add_refused(lora, compat.REFUSED_LORA)
    lora.set_defaults(func=cmd_convert_lora)
    base = convert.add_parser("base", help="Hugging Face Llama-family folder -> GGUF base")
    base.add_argument("source")
    base.add_argument("--out", "--outfile", dest="out", help="output path ({ftype} is replaced by the outtype)")
    base.add_argument(
        "--outtype",
        choices=[*OUTTYPES, *(q for q in LLAMA_QUANTS if q not in OUTTYPES), "auto"],
        default="f16",
        help="k-quants and q4_0 go through llama.cpp's quantizer; auto: f16, or bf16 for bf16 weights",
    )
    base.add_argument("--vocab-only", action="store_true", help="write the metadata and vocabulary, no tensors")
    base.add_argument("--dry-run", action="store_true", help="check the folder and print the plan; write nothing")
    base.add_argument("--model-name", help="general.name (default: the folder's name)")
    base.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    compat.add_refused(base, compat.REFUSED_CONVERT)
    base.add_argument("--verify", action="store_true", help="compare logits with PyTorch afterwards")
    base.add_argument("--json", action="store_true")
    base.set_defaults(func=cmd_convert_base)

    verify = sub.add_parser("verify", help="compare PyTorch and llama.cpp logits for a base (and an adapter)")
    verify.add_argument("base", help="registered base name")
    verify.add_argument("--adapter", help="adapter name[@vN] from the store, or a PEFT folder")
    verify.add_argument("--min-top1", type=float, help="override the top-1 agreement threshold")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)

    inspect = sub.add_parser("inspect", help="metadata, tensors and sizes of a GGUF file")
    inspect.add_argument("file")
    inspect.add_argument("--base", help="check an adapter against this base (name, GGUF or HF folder)")
    inspect.add_argument("--all", action="store_true", help="list every tensor")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    estimate = sub.add_parser("estimate", help="adapter size and memory, from a config.json alone")
    estimate.add_argument(
        "--base", required=True, help="profile name (codellama-7b-instruct, smollm2-135m-instruct), config.json or GGUF"
    )
    estimate.add_argument("--config", help="training config whose lora_config to size (default: r=8 q/k/v)")
    estimate.add_argument("--seq", type=int, default=2048, help="training sequence length")
    estimate.add_argument("--base-type", default="q4_k_m", help="GGUF type of the served base")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=cmd_estimate)
