"""`scalpel adapters`: the adapter registry (versions, the live pointer, history, diff)."""

from __future__ import annotations

import argparse
import json


def cmd_adapters_list(args) -> None:
    from core import adapter_store

    rows: list[dict] = []
    for name in adapter_store.list_adapters():
        root = adapter_store.root_for_name(name)
        rows.append(
            {"name": name, "active": adapter_store.active_version(root), "versions": adapter_store.versions(root)}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows or [{"name": "(no adapters)", "active": "", "versions": []}]:
        print(f"{row['name']:<40} live {row['active'] or '-':<5} versions {', '.join(row['versions'])}")


def cmd_adapters_show(args) -> None:
    from core import adapter_store

    version = adapter_store.resolve(args.ref)
    manifest = version.manifest
    if args.json:
        print(json.dumps({"ref": version.ref, "path": str(version.path), "manifest": manifest.to_json()}, indent=2))
        return
    root = adapter_store.root_for_name(version.name)
    metrics, base, gguf = manifest.metrics, manifest.base, manifest.gguf
    final_loss = metrics.final_loss if metrics.final_loss is not None else float("nan")
    print(f"{version.ref}  ({'live' if adapter_store.active_version(root) == version.version else 'not live'})")
    print(f"  base      {base.name} ({base.fingerprint[:12]})" if base else "  base      -")
    print(f"  parent    {manifest.parent_version or '-'}    created {manifest.created_at}")
    if origin := manifest.imported_from:
        print(f"  imported  {origin.format} from {origin.source} (sha256 {origin.sha256[:12]})")
    else:
        print("  data      " + ", ".join(f"{k} {v.sha256[:12]}" for k, v in manifest.datasets.items()))
        print(f"  training  {metrics.examples} examples, {metrics.global_step} steps, final loss {final_loss:.4f}")
    if gguf:
        print(f"  gguf      {gguf.size_bytes / 1e6:.2f} MB ({gguf.outtype})")
    if manifest.eval:
        print(f"  eval      {json.dumps(manifest.eval)[:200]}")
    for h in adapter_store.activation_history(root)[-5:]:
        print(f"  history   {h['at']}  {h['version']}  {h.get('reason') or ''}")


def cmd_adapters_promote(args) -> None:
    from core import adapter_store

    previous = adapter_store.promote(args.name, args.version)
    print(f"{args.name}: {previous} -> {args.version} (live)")


def cmd_adapters_rollback(args) -> None:
    from core import adapter_store

    before, after = adapter_store.rollback(args.name, args.to)
    print(f"{args.name}: {before} -> {after} (live)")


def cmd_adapters_diff(args) -> None:
    from core.version_diff import diff

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
        print(
            f"  weights: LoRA update changed by {w['mean_relative_change']:.1%} on average "
            f"(max {w['max_relative_change']:.1%}) over {w['modules']} modules"
        )
    else:
        print(f"  weights: not comparable: {w.get('reason') or 'different module sets'}")


def cmd_adapters_delete(args) -> None:
    from core import adapter_store

    adapter_store.delete_version(args.name, args.version)
    print(f"deleted {args.name}@{args.version}")


def cmd_adapters_check(args) -> None:
    from core.errors import ScalpelError
    from core.store_check import check_store

    findings = check_store(args.names or None, repair=args.repair)
    for f in findings:
        if f.repaired:
            outcome = f"repaired: {f.repair}"
        elif f.repair:
            outcome = f"repairable with --repair: {f.repair}"
        else:
            outcome = "cannot be repaired here: promote another version or delete this one"
        print(f"{f.name}: {f.problem}\n    {outcome}")
    left = [f for f in findings if not f.repaired]
    if left:
        raise ScalpelError(f"{len(left)} problem(s) in the adapter store ({len(findings) - len(left)} repaired)")
    print(
        f"the adapter store is intact ({len(findings)} problem(s) repaired)"
        if findings
        else "the adapter store is intact"
    )


def cmd_adapters_import(args) -> None:
    from pathlib import Path

    from scalpel.importer import import_adapter

    imported = import_adapter(
        args.name, Path(args.path), base=args.base, verify=args.verify, promote=not args.no_promote
    )
    if args.json:
        print(json.dumps({"ref": imported.version.ref, "live": imported.live, **imported.manifest.to_json()}, indent=2))
        return
    origin, gguf = imported.manifest.imported_from, imported.manifest.gguf
    assert origin is not None and gguf is not None
    print(
        f"imported {imported.version.ref} from {origin.format} ({gguf.modules} modules, rank {gguf.rank}, "
        f"{gguf.size_bytes / 1e6:.2f} MB) for {args.base}" + (" (live)" if imported.live else " (not live)")
    )
    if origin.verify:
        print(f"  verify: {origin.verify['criterion']}: PASS")


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
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
    a_import = adapters_sub.add_parser(
        "import", help="add an adapter trained elsewhere (PEFT folder, GGUF LoRA, or zip of a PEFT folder)"
    )
    a_import.add_argument("name", help="the adapter's name in the store (a new one, or a new version of one)")
    a_import.add_argument("path", help="PEFT folder (adapter_model.safetensors), GGUF LoRA file, or .zip of a folder")
    a_import.add_argument("--base", required=True, help="the registered base it was trained on")
    a_import.add_argument(
        "--verify", action="store_true", help="PEFT only: also compare PyTorch and llama.cpp logits (loads the base)"
    )
    a_import.add_argument("--no-promote", action="store_true", help="publish without making it live")
    a_import.add_argument("--json", action="store_true")
    a_import.set_defaults(func=cmd_adapters_import)
    a_check = adapters_sub.add_parser(
        "check", help="report damaged entries (pointer, manifests, hashes); --repair fixes what history allows"
    )
    a_check.add_argument("names", nargs="*", help="adapters to check (default: all)")
    a_check.add_argument("--repair", action="store_true", help="repair what can be repaired, e.g. a lost pointer")
    a_check.set_defaults(func=cmd_adapters_check)
