"""The `scalpel` command: one subcommand per stage of the journey, and `demo` for the whole loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scalpel.errors import ScalpelError
from scalpel.paths import enforce_offline

OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
BASE_OUTTYPES = OUTTYPES + ["q4_0", "q4_k_m", "q5_k_m", "q6_k"]


def cmd_models_list(args) -> None:
    from scalpel import model_store
    model_store.ensure_default()
    for m in model_store.list_models():
        size = Path(m.gguf).stat().st_size / 1e6
        print(f"{m.name:32} {m.format:5} {m.architecture:8} {size:8.1f} MB  {m.source}")


def cmd_models_add(args) -> None:
    from scalpel import model_store, paths
    source = Path(args.path).expanduser().resolve()
    paths.check_name(args.name, "model")
    if source.is_dir():
        from conversion.architecture import read_hf_config
        from conversion.hf_to_gguf import convert_base
        read_hf_config(source)  # fail early on a folder that is not a model
        template = _hf_chat_template(source)
        out = paths.models_dir() / args.name / f"model-{args.outtype}.gguf"
        print(f"converting {source} to {out} ({args.outtype})")
        convert_base(source, out, outtype=args.outtype)
        entry = model_store.register_gguf(args.name, out, source=source, fmt="hf", chat_template=template,
                                          replace=args.replace)
    elif source.is_file():
        entry = model_store.register_gguf(args.name, source, replace=args.replace)
    else:
        raise ScalpelError(f"no such file or folder: {source}", param="path")
    print(f"registered {entry.name} ({entry.architecture}, {entry.format}) fingerprint {entry.fingerprint[:12]}")


def _hf_chat_template(folder: Path) -> str | None:
    """transformers 5 saves the template as chat_template.jinja; older folders keep it in tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def cmd_train(args) -> None:
    from scalpel.pipeline import train_and_publish
    from training.config import load_config
    config = load_config(Path(args.config))
    if args.suite:
        from scalpel.evaluate import load_suite
        for suite in args.suite:
            load_suite(Path(suite))  # a bad suite fails now, not after training
    result = train_and_publish(config, Path(args.data), eval_data=Path(args.eval_data) if args.eval_data else None,
                               model=args.model, outtype=args.outtype, max_steps=args.max_steps,
                               eval_suites=tuple(Path(s) for s in args.suite))
    m = result.manifest
    for finding in result.warnings:
        print(f"data warning: {finding.where}: {finding.message} [{finding.code}]", file=sys.stderr)
    print(f"\nadapter {result.version.ref} written to {result.version.path}")
    print(f"  final loss {m['metrics']['final_loss']:.4f}, {m['metrics']['examples']} examples, "
          f"train {result.train_seconds:.0f} s, convert {result.convert_seconds:.2f} s, "
          f"GGUF {m['gguf']['size_bytes'] / 1e6:.2f} MB")


def cmd_convert_lora(args) -> None:
    from conversion.architecture import layout_for
    from conversion.lora_to_gguf import BASE_FINGERPRINT_KEY, convert_lora
    from scalpel import model_store
    metadata = {}
    if Path(args.base).exists():
        layout = layout_for(Path(args.base))
    else:
        entry = model_store.get(args.base)
        layout, metadata = layout_for(entry.gguf_path), {BASE_FINGERPRINT_KEY: entry.fingerprint}
    out = Path(args.out) if args.out else Path(args.adapter) / "adapter.gguf"
    result = convert_lora(Path(args.adapter), layout, out, outtype=args.outtype, metadata=metadata)
    print(f"wrote {result.path} ({result.n_modules} modules, rank {result.rank}, alpha {result.alpha:g}, "
          f"{result.path.stat().st_size / 1e6:.2f} MB)")
    if args.verify:
        if Path(args.base).exists():
            raise ScalpelError("--verify needs a registered base (scalpel models add), so that both its "
                               "PyTorch weights and its GGUF are known", param="base")
        from conversion.verify import verify
        from training.base_model import load_model, load_tokenizer
        report = verify(load_model(entry), load_tokenizer(entry), entry.gguf_path, peft_dir=Path(args.adapter),
                        adapter_gguf=out)
        _report_verify(report, False)


def cmd_convert_base(args) -> None:
    from conversion.hf_to_gguf import convert_to
    out = Path(args.out) if args.out else Path(args.source) / f"model-{args.outtype}.gguf"
    path = convert_to(Path(args.source), out, args.outtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.verify:
        from conversion.verify import verify
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from training.base_model import match_llama_cpp_spm
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype="float32", use_safetensors=True)
        report = verify(model, match_llama_cpp_spm(AutoTokenizer.from_pretrained(args.source)), path)
        _report_verify(report, args.json)


def _report_verify(report, as_json: bool) -> None:
    """Print a verify report; a failed one is an error (exit status 2)."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"verify {report.file_type}{' + adapter' if report.adapter else ''}: {report.positions} positions, "
              f"max abs {report.max_abs:.3g}, mean abs {report.mean_abs:.3g}, top-1 agreement {report.top1:.1%} "
              f"(on the {report.decided_positions} decided positions: {report.top1_decided:.1%}) "
              f"[{report.criterion}: {'PASS' if report.passed else 'FAIL'}]")
    if not report.passed:
        raise ScalpelError(f"verification failed: {report.criterion} not met", code="verify_failed")


def cmd_verify(args) -> None:
    from conversion.verify import verify
    from scalpel import adapter_store, model_store
    from training.base_model import load_model, load_tokenizer
    entry = model_store.get(args.base)
    peft_dir = adapter_gguf = None
    if args.adapter:
        if Path(args.adapter).is_dir():
            peft_dir = Path(args.adapter)
        else:
            version = adapter_store.resolve(args.adapter)
            peft_dir, adapter_gguf = version.path, version.gguf
    report = verify(load_model(entry), load_tokenizer(entry), entry.gguf_path, peft_dir=peft_dir,
                    adapter_gguf=adapter_gguf, min_top1=args.min_top1)
    _report_verify(report, args.json)


def cmd_inspect(args) -> None:
    from conversion.architecture import layout_for
    from conversion.inspect_gguf import check_adapter, summarize, tensor_table
    from scalpel import model_store
    from scalpel.gguf_meta import read_gguf
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
        print(json.dumps({"summary": summary, "metadata": info.metadata,
                          "tensors": [dict(zip(("name", "type", "shape", "mb"), row)) for row in tensor_table(info)],
                          "compatibility": vars(compat) if compat else None}, indent=2, default=str))
    else:
        print(f"{summary['file']}: GGUF {summary['type']}, {summary['architecture']}, "
              f"{summary['tensors']} tensors, {summary['size_mb']:.2f} MB")
        for key, value in info.metadata.items():
            text = repr(value)
            print(f"  {key:42} {text[:90] + '...' if len(text) > 90 else text}")
        print(f"  {'tensor types':42} " + ", ".join(f"{k}: {v['tensors']} ({v['mb']:.1f} MB)"
                                                     for k, v in summary["tensor_types"].items()))
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
    result = {"base": args.base, "layers": layout.n_layers, "adapter": vars(surgical), "nuclear": vars(nuclear),
              "nuclear_over_adapter": nuclear.params / surgical.params,
              "memory": vars(mem) if mem else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"base {args.base}: {layout.arch_name}, {layout.n_layers} layers")
    for label, est in (("this adapter", surgical), ("nuclear (r=32, 7 modules)", nuclear)):
        sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in est.size_mb.items())
        print(f"  {label:27} r={est.r:<3} {'/'.join(est.target_modules)}: {est.params:,} params; {sizes}")
    print(f"  nuclear is {result['nuclear_over_adapter']:.1f}x the size of this adapter")
    if mem:
        print(f"  base parameters {mem.base_params / 1e9:.2f} B; train ~{mem.train_gb:.1f} GB, "
              f"serve ~{mem.serve_gb:.2f} GB")
        for note in mem.notes:
            print(f"    ({note})")


def cmd_serve(args) -> None:
    from serving.server import serve
    from serving.settings import ServeSettings
    overrides = {k: v for k, v in {"model": args.model, "host": args.host, "port": args.port,
                                   "n_ctx": args.n_ctx, "threads": args.threads,
                                   "n_gpu_layers": args.n_gpu_layers, "api_key_file": args.api_key_file,
                                   "api_keys": args.api_key or None, "preload": args.adapter or None,
                                   "training_data": args.training_data}.items()
                 if v is not None}
    serve(ServeSettings(**overrides))


def cmd_data_check(args) -> None:
    from training.dataset import load_examples
    from training.quality import QualityRules, check
    examples = load_examples(Path(args.file))
    rules = QualityRules(min_examples=args.min_examples, min_avg_answer_words=args.min_avg_words,
                         strict=args.strict)
    counts = None
    if args.model:
        from scalpel import model_store
        from training.base_model import load_tokenizer, template_info
        from training.dataset import tokenize_example
        entry = model_store.get(args.model)
        tokenizer, info = load_tokenizer(entry), template_info(entry)
        counts = [tokenize_example(ex, tokenizer, info, args.max_seq_length)["n_tokens"] for ex in examples]
    report = check(examples, rules, counts, args.max_seq_length)
    print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if args.json else
          f"{args.file}: {report.as_text()}")
    if report.errors:
        raise ScalpelError(f"{args.file}: {len(report.errors)} errors", code="dataset_errors")


def cmd_adapters_list(args) -> None:
    from scalpel import adapter_store
    rows = []
    for name in adapter_store.list_adapters():
        root = adapter_store.root_for_name(name)
        rows.append({"name": name, "active": adapter_store.active_version(root),
                     "versions": adapter_store.versions(root)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows or [{"name": "(no adapters)", "active": "", "versions": []}]:
        print(f"{row['name']:<40} live {row['active'] or '-':<5} versions {', '.join(row['versions'])}")


def cmd_adapters_show(args) -> None:
    from scalpel import adapter_store
    version = adapter_store.resolve(args.ref)
    manifest = version.manifest
    if args.json:
        print(json.dumps({"ref": version.ref, "path": str(version.path), "manifest": manifest}, indent=2))
        return
    root = adapter_store.root_for_name(version.name)
    metrics = manifest.get("metrics") or {}
    print(f"{version.ref}  ({'live' if adapter_store.active_version(root) == version.version else 'not live'})")
    print(f"  base      {manifest['base']['name']} ({manifest['base']['fingerprint'][:12]})")
    print(f"  parent    {manifest.get('parent_version') or '-'}    created {manifest.get('created_at')}")
    print(f"  data      " + ", ".join(f"{k} {v['sha256'][:12]}" for k, v in manifest.get("datasets", {}).items()))
    print(f"  training  {metrics.get('examples')} examples, {metrics.get('global_step')} steps, final loss "
          f"{metrics.get('final_loss', float('nan')):.4f}")
    print(f"  gguf      {manifest['gguf']['size_bytes'] / 1e6:.2f} MB ({manifest['gguf']['outtype']})")
    if manifest.get("eval"):
        print(f"  eval      {json.dumps(manifest['eval'])[:200]}")
    for h in adapter_store.activation_history(root)[-5:]:
        print(f"  history   {h['at']}  {h['version']}  {h.get('reason') or ''}")


def cmd_adapters_promote(args) -> None:
    from scalpel import adapter_store
    previous = adapter_store.promote(args.name, args.version)
    print(f"{args.name}: {previous} -> {args.version} (live)")


def cmd_adapters_rollback(args) -> None:
    from scalpel import adapter_store
    before, after = adapter_store.rollback(args.name, args.to)
    print(f"{args.name}: {before} -> {after} (live)")


def cmd_adapters_diff(args) -> None:
    from scalpel.version_diff import diff
    result = diff(args.name, args.a, args.b)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.name}: {args.a} -> {args.b}")
    for section in ("config", "datasets", "metrics", "eval"):
        for key, change in result[section].items():
            print(f"  {section}.{key}: {change['from']} -> {change['to']}")
    w = result["weights"]
    if w["comparable"]:
        print(f"  weights: LoRA update changed by {w['mean_relative_change']:.1%} on average "
              f"(max {w['max_relative_change']:.1%}) over {w['modules']} modules")
    else:
        print("  weights: different module sets")


def cmd_adapters_delete(args) -> None:
    from scalpel import adapter_store
    adapter_store.delete_version(args.name, args.version)
    print(f"deleted {args.name}@{args.version}")


def cmd_eval(args) -> None:
    import time

    from scalpel import adapter_store, evaluate, model_store, paths
    from scalpel.atomic import write_json
    from serving.engine import Engine
    suites = {Path(f).stem: evaluate.load_suite(Path(f)) for f in args.suite}
    if args.ref in [e.name for e in model_store.list_models()]:
        base, version = model_store.get(args.ref), None
    else:
        version = adapter_store.resolve(args.ref)
        base = model_store.get(version.manifest["base"]["name"])
        if not suites:  # the suites recorded with the version, if any
            suites = {Path(f).stem: evaluate.load_suite(f) for f in sorted(version.path.glob("eval/*.json"))}
    if not suites and args.no_regression:
        raise ScalpelError("nothing to evaluate: give --suite FILE, or drop --no-regression", param="suite")
    engine = Engine(base)
    try:
        adapters = ((engine.load(version), 1.0),) if version else ()
        report = evaluate.evaluate(engine, adapters, suites, version.ref if version else base.name,
                                   regression=not args.no_regression)
    finally:
        engine.close()
    out = Path(args.out) if args.out else paths.state_dir() / "evals" / f"{report.ref.replace('@', '-')}-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report.as_dict())
    report.plot(out / "eval.png")
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.as_text())
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}", file=sys.stderr)


def cmd_update(args) -> None:
    from scalpel.update import UpdateSettings, run_inbox, run_update
    if bool(args.data) == bool(args.inbox):
        raise ScalpelError("give either --data FILE (with an optional --eval) or --inbox DIR", param="data")
    values = {"replay_ratio": args.replay_ratio, "replay_per_concept": args.replay_per_concept,
              "preservation_ratio": args.preservation_ratio,
              "preservation_loss": args.preservation_loss, "preservation_weight": args.preservation_weight,
              "num_epochs": args.epochs, "learning_rate": args.learning_rate,
              "min_retention": args.min_retention, "min_new_knowledge": args.min_new_knowledge,
              "min_base_agreement": args.min_base_agreement, "max_candidates": args.candidates,
              "max_update_seconds": args.max_seconds, "keep_full_replay": args.keep_full_replay}
    try:
        settings = UpdateSettings(**{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        raise ScalpelError(f"invalid update setting: {exc}", param="settings") from exc
    if args.inbox:
        results = run_inbox(args.name, Path(args.inbox), settings=settings, attempts=args.attempts)
    else:
        results = [run_update(args.name, Path(args.data), eval_suite=Path(args.eval) if args.eval else None,
                              settings=settings)]
    for r in results:
        print(f"{r.version.ref}: {'live' if r.promoted else 'kept, not live'} after {r.seconds:.0f} s")
        for c in r.candidates[:-1]:
            print(f"  candidate {c['version']} failed its gates first ({'; '.join(c['reasons'])})")
        for name, suite in r.eval["suites"].items():
            print(f"  {name:<40} {suite['accuracy']:6.0%}")
        base = r.eval.get("base_regression")
        if base:
            print(f"  {'base agreement':<40} {base['agreement']:6.1%}   ({base['agreement_all_positions']:.1%} of all "
                  f"picks)   perplexity {base['perplexity_change']:+.1%}")
        for reason in r.reasons:
            print(f"  gate failed: {reason}")


def _jobs_client(args):
    from scalpel.jobs_client import JobsClient
    return JobsClient(args.url, args.api_key)


def cmd_jobs_start(args) -> None:
    client = _jobs_client(args)
    job = client.start(Path(args.config), Path(args.data), eval_data=Path(args.eval_data) if args.eval_data else None,
                       model=args.model, max_steps=args.max_steps)
    print(f"started {job['id']} ({job['adapter']} on {job['model']})")
    if args.watch:
        _finish_watch(client.watch(job["id"]))


def _finish_watch(job: dict) -> None:
    from scalpel.jobs_client import summary
    print(summary(job))
    if job["status"] != "succeeded":
        error = (job.get("error") or {}).get("message", job["status"])
        raise ScalpelError(f"job {job['id']} {job['status']}: {error}", code="job_" + job["status"])


def cmd_jobs_list(args) -> None:
    from scalpel.jobs_client import summary
    jobs = _jobs_client(args).list()
    print(json.dumps(jobs, indent=2) if args.json else "\n".join(summary(j) for j in jobs) or "no jobs")


def cmd_jobs_show(args) -> None:
    from scalpel.jobs_client import summary
    job = _jobs_client(args).get(args.job_id)
    print(json.dumps(job, indent=2) if args.json else summary(job))


def cmd_jobs_watch(args) -> None:
    _finish_watch(_jobs_client(args).watch(args.job_id))


def cmd_jobs_cancel(args) -> None:
    job = _jobs_client(args).cancel(args.job_id)
    print(f"{job['id']}: {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


def cmd_demo(args) -> None:
    from scalpel.demo import run_demo
    run_demo(max_steps=args.max_steps)


def cmd_doctor(args) -> None:
    from scalpel.doctor import report
    if not report(model=args.model, as_json=args.json):
        raise ScalpelError("doctor found a problem (see above)", code="doctor_failed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalpel", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    # --threads for every command that runs llama.cpp; it sets SCALPEL_THREADS for this process
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int,
                         help="llama.cpp CPU threads (default: $SCALPEL_THREADS, else every usable physical core)")

    models = sub.add_parser("models", help="the base-model store").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="list registered bases").set_defaults(func=cmd_models_list)
    add = models.add_parser("add", help="register a GGUF file or a Hugging Face folder as a base")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--outtype", choices=OUTTYPES, default="f16", help="GGUF type for an HF folder")
    add.add_argument("--replace", action="store_true", help="replace an existing entry of that name")
    add.set_defaults(func=cmd_models_add)

    train = sub.add_parser("train", help="train a LoRA from a plan-style config and publish a new version")
    train.add_argument("config", help="training config JSON (the plan's format)")
    train.add_argument("--data", required=True, help="JSON list, JSONL, or OpenAI chat JSONL")
    train.add_argument("--eval-data", help="validation examples, evaluated every eval_steps")
    train.add_argument("--model", help="base to train on instead of the config's model_name")
    train.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF type of the adapter")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--suite", action="append", default=[],
                       help="eval suite kept with the version: later updates must retain it (repeatable)")
    train.set_defaults(func=cmd_train)

    convert = sub.add_parser("convert", help="GGUF conversion").add_subparsers(dest="what", required=True)
    lora = convert.add_parser("lora", help="PEFT adapter folder -> GGUF LoRA adapter")
    lora.add_argument("adapter")
    lora.add_argument("--base", required=True, help="registered base name, base GGUF file, or HF folder")
    lora.add_argument("--out")
    lora.add_argument("--outtype", choices=OUTTYPES, default="f32")
    lora.add_argument("--verify", action="store_true", help="compare with PEFT in PyTorch afterwards")
    lora.set_defaults(func=cmd_convert_lora)
    base = convert.add_parser("base", help="Hugging Face Llama-family folder -> GGUF base")
    base.add_argument("source")
    base.add_argument("--out")
    base.add_argument("--outtype", choices=BASE_OUTTYPES, default="f16",
                      help="k-quants and q4_0 go through llama.cpp's quantizer")
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
    estimate.add_argument("--base", required=True,
                          help="profile name (codellama-7b-instruct, smollm2-135m-instruct), config.json or GGUF")
    estimate.add_argument("--config", help="training config whose lora_config to size (default: r=8 q/k/v)")
    estimate.add_argument("--seq", type=int, default=2048, help="training sequence length")
    estimate.add_argument("--base-type", default="q4_k_m", help="GGUF type of the served base")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=cmd_estimate)

    serve = sub.add_parser("serve", parents=[threads], help="OpenAI-compatible server (settings also from SCALPEL_* env vars)")
    serve.add_argument("--model", help="registered base name")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--n-ctx", type=int)
    serve.add_argument("--n-gpu-layers", type=int, help="-1 (default): all layers on Metal/CUDA builds")
    serve.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable)")
    serve.add_argument("--api-key-file", help="file with one accepted key per line")
    serve.add_argument("--adapter", action="append", help="adapter to load at start (repeatable)")
    serve.add_argument("--training-data", help="dataset for /api/training/start requests that name none "
                                               "(a path below SCALPEL_HOME, or a file id)")
    serve.set_defaults(func=cmd_serve)

    data = sub.add_parser("data", help="knowledge files").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="validate a dataset: schema, encoding, duplicates, conflicts, "
                                          "length, concept balance, the plan's quality metrics")
    check.add_argument("file")
    check.add_argument("--model", help="count tokens with this base's tokenizer and chat template")
    check.add_argument("--max-seq-length", type=int, default=2048)
    check.add_argument("--min-examples", type=int, default=100)
    check.add_argument("--min-avg-words", type=float, default=150)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_data_check)

    adapters = sub.add_parser("adapters", help="the adapter registry: versions, the live pointer, history")
    adapters_sub = adapters.add_subparsers(dest="action", required=True)
    a_list = adapters_sub.add_parser("list", help="adapters with their live version and all versions")
    a_list.add_argument("--json", action="store_true")
    a_list.set_defaults(func=cmd_adapters_list)
    a_show = adapters_sub.add_parser("show", help="one version's manifest (NAME for the live one, NAME@vN)")
    a_show.add_argument("ref")
    a_show.add_argument("--json", action="store_true")
    a_show.set_defaults(func=cmd_adapters_show)
    a_promote = adapters_sub.add_parser("promote", help="make a version live (a running server follows)")
    a_promote.add_argument("name")
    a_promote.add_argument("version")
    a_promote.set_defaults(func=cmd_adapters_promote)
    a_rollback = adapters_sub.add_parser("rollback", help="go back to the previously live version (or --to vN)")
    a_rollback.add_argument("name")
    a_rollback.add_argument("--to")
    a_rollback.set_defaults(func=cmd_adapters_rollback)
    a_diff = adapters_sub.add_parser("diff", help="config, data, metrics, eval and weight changes between versions")
    a_diff.add_argument("name")
    a_diff.add_argument("a")
    a_diff.add_argument("b")
    a_diff.add_argument("--json", action="store_true")
    a_diff.set_defaults(func=cmd_adapters_diff)
    a_delete = adapters_sub.add_parser("delete", help="delete one version for good (never the live one)")
    a_delete.add_argument("name")
    a_delete.add_argument("version")
    a_delete.set_defaults(func=cmd_adapters_delete)

    up = sub.add_parser("update", parents=[threads], help="the evening update: continue the live version on new knowledge, "
                                       "with replay and base preservation, promote only past the gates")
    up.add_argument("name", help="the adapter to update (its live version is the starting point)")
    up.add_argument("--data", help="the new knowledge file")
    up.add_argument("--eval", help="eval suite for the new knowledge (kept with the version)")
    up.add_argument("--inbox", help="process every knowledge file in this folder (NAME.eval.json beside each), "
                                    "then archive it; one that is not promoted stays for the next run")
    up.add_argument("--attempts", type=int, default=3,
                    help="with --inbox: runs a file is tried on before it moves to not-promoted/ (default 3)")
    up.add_argument("--replay-ratio", type=float, help="earlier examples replayed per new example, spread over the "
                                                       "earlier concepts (default 1)")
    up.add_argument("--replay-per-concept", type=int, help="but at least this many from every earlier concept "
                                                           "(default 3)")
    up.add_argument("--preservation-ratio", type=float, help="base-model answers per new example (default 0.5)")
    up.add_argument("--preservation-loss", choices=["distill", "answers"],
                    help="distill (default): match the base's whole next-token distribution on those answers "
                         "(KL); answers: learn them as ordinary answers")
    up.add_argument("--preservation-weight", type=float, help="weight of the distillation term (default 4)")
    up.add_argument("--epochs", type=float, help="default: the live version's num_epochs")
    up.add_argument("--learning-rate", type=float, help="default: a third of the first version's learning_rate")
    up.add_argument("--min-retention", type=float, help="gate on earlier suites (default 0.95)")
    up.add_argument("--min-new-knowledge", type=float, help="gate on the new suite (default 0.95)")
    up.add_argument("--min-base-agreement", type=float, help="gate on base regression (default 0.95)")
    up.add_argument("--candidates", type=int, help="candidates trained at most, each leaning on what the one "
                                                   "before failed (default 3)")
    up.add_argument("--max-seconds", type=float, help="no further candidate is started when it would end past "
                                                      "this many seconds (default 600)")
    up.add_argument("--keep-full-replay", action=argparse.BooleanOptionalAction, default=None,
                    help="start with the full replay of every concept an earlier update had to replay in full "
                         "(default on)")
    up.set_defaults(func=cmd_update)

    ev = sub.add_parser("eval", parents=[threads], help="score a base or adapter version through llama.cpp (greedy): suites and "
                                     "base regression")
    ev.add_argument("ref", help="a base name, an adapter (its live version) or NAME@vN")
    ev.add_argument("--suite", action="append", default=[], help="eval suite JSON (repeatable; default: the "
                                                                 "suites stored with the version)")
    ev.add_argument("--no-regression", action="store_true", help="skip the base-regression checks")
    ev.add_argument("--out", help="folder for eval.json and eval.png (default .scalpel/evals/...)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    jobs = sub.add_parser("jobs", help="training jobs on a running server (scalpel serve)")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help="server URL (default: $SCALPEL_URL or http://127.0.0.1:8000)")
    connection.add_argument("--api-key", help="Bearer key (default: $SCALPEL_API_KEY)")
    start = jobs_sub.add_parser("start", parents=[connection], help="upload a dataset and start a job")
    start.add_argument("config", help="a plan-style training config (JSON)")
    start.add_argument("--data", required=True, help="knowledge file (uploaded to the server)")
    start.add_argument("--eval-data", help="evaluation file (uploaded to the server)")
    start.add_argument("--model", help="registered base to train on instead of the config's model_name")
    start.add_argument("--max-steps", type=int, help="cap training steps")
    start.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    start.set_defaults(func=cmd_jobs_start)
    listing = jobs_sub.add_parser("list", parents=[connection], help="jobs, newest first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_jobs_list)
    for action, func, text in (("show", cmd_jobs_show, "one job"), ("watch", cmd_jobs_watch, "follow a job live"),
                               ("cancel", cmd_jobs_cancel, "cancel a queued or running job")):
        one = jobs_sub.add_parser(action, parents=[connection], help=text)
        one.add_argument("job_id")
        if action == "show":
            one.add_argument("--json", action="store_true")
        one.set_defaults(func=func)

    demo = sub.add_parser("demo", parents=[threads], help="the whole loop on the embedded default model")
    demo.add_argument("--max-steps", type=int, help="cap training steps (for a quick look)")
    demo.set_defaults(func=cmd_demo)

    doctor = sub.add_parser("doctor", parents=[threads],
                            help="what a bug report needs: llama.cpp's build, torch's device, versions, threads, "
                                 "and a one-token generation in a child process")
    doctor.add_argument("--model", help="registered base for the generation test (default: the embedded model)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    enforce_offline()
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            from scalpel import threads
            os.environ[threads.ENV] = str(threads.resolve(args.threads))
        args.func(args)
    except ScalpelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the stores are unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
