"""JSON Schemas as llama.cpp grammars (GBNF), through llama-cpp-python's own converter, so an answer must fit them."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from core.errors import ScalpelError

# Keywords the converter does not turn into grammar rules: an answer could break them. A strict schema that uses
# one is refused; otherwise they are ignored, as llama-server does.
UNENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "not",
        "if",
        "then",
        "else",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")
ANY_OBJECT: dict = {"type": "object"}  # json_object: any JSON object, with single spaces (no runaway whitespace)


# A JSON string character. The converter's own `char` lets raw control characters (a newline) into strings,
# which JSON forbids; this is llama.cpp's json.gbnf rule.
JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ' + " ".join(["[0-9a-fA-F]"] * 4) + ")")


class _Converter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, JSON_CHAR if name == "char" else rule)


class Grammar:
    """A GBNF text built up from JSON Schemas, each under its own rule names, plus hand-written rules."""

    def __init__(self) -> None:
        self._converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._rules: list[str] = []

    def schema(self, schema: Any, *, name: str, param: str, strict: bool = False) -> str:
        """Add the rules for `schema` and return the name of its top rule ("root" when `name` is "")."""
        if not isinstance(schema, dict):
            raise ScalpelError(f"{param} must be a JSON Schema object", param=param, code="invalid_schema")
        if strict and (found := _unenforced(schema, param)):
            raise ScalpelError(
                f"{found[0]} uses {found[1]!r}, which a grammar cannot enforce; drop it or set strict to false",
                param=found[0],
                code="unsupported_schema",
            )
        try:
            resolved = self._converter.resolve_refs(_namespaced(schema, name), f"{name or 'root'}")
            return self._converter.visit(resolved, name)
        except RecursionError as exc:
            raise ScalpelError(f"{param} nests too deeply", param=param, code="invalid_schema") from exc
        except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            # the converter's own checks are asserts and lookups; what they reject is the schema
            raise ScalpelError(
                f"{param} cannot be turned into a grammar: {str(exc)[:200] or type(exc).__name__}",
                param=param,
                code="invalid_schema",
            ) from exc

    def rule(self, name: str, body: str) -> str:
        self._rules.append(f"{name} ::= {body}")
        return name

    def text(self) -> str:
        return "\n".join([self._converter.format_grammar(), *self._rules])


def schema_grammar(schema: Any, *, param: str, strict: bool = False) -> str:
    """A grammar whose every complete sentence is a JSON document valid for `schema`."""
    grammar = Grammar()
    grammar.schema(schema, name="", param=param, strict=strict)
    return grammar.text()


def literal(text: str) -> str:
    """A GBNF string literal (JSON's escapes are GBNF's)."""
    return json.dumps(text, ensure_ascii=False)


def _namespaced(schema: dict, name: str) -> dict:
    """A copy for the converter: top-level definitions renamed `<name>-<def>` (it names a definition's rule after
    its last path segment, so two schemas that each define `Item` would otherwise share one rule), a list of
    types beside other keywords split into anyOf (it would keep the types and drop the rest), and patterns that
    are not safe_pattern() dropped."""
    renamed: dict[str, str] = {}
    out = copy.deepcopy(schema)
    for key in ("$defs", "definitions") if name else ():
        if isinstance(out.get(key), dict):
            out[key] = {f"{name}-{k}": v for k, v in out[key].items()}
            renamed.update({f"#/{key}/{k}": f"#/{key}/{name}-{k}" for k in schema[key]})

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(x) for x in node]
        if not isinstance(node, dict):
            return node
        result = {k: visit(v) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str):
            for old, new in renamed.items():
                if ref == old or ref.startswith(old + "/"):
                    result["$ref"] = new + ref[len(old) :]
        if "pattern" in result and not safe_pattern(result["pattern"]):
            del result["pattern"]  # not strict (a strict schema was refused): the string goes unchecked
        types = result.get("type")
        if isinstance(types, list) and len(result) > 1:
            # {"type": ["object", "null"], "properties": ...}: the converter would drop the properties
            rest = {k: v for k, v in result.items() if k != "type"}
            return {"anyOf": [{**rest, "type": t} for t in types]}
        return result

    return visit(out)


def safe_pattern(pattern: Any) -> bool:
    """Whether the converter's grammar for `pattern` only writes characters a JSON string may hold as they are.

    It copies the pattern's characters into the string unescaped, so `.`, `[^...]`, escapes, a quote, or a class
    whose range spans a quote, a backslash or control characters could break the JSON; and it takes only patterns
    anchored with ^...$ (JSON Schema's are searched for anywhere). Others are refused (strict) or dropped.
    """
    if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
        return False
    if any(c in pattern for c in '.\\"') or "[^" in pattern:
        return False
    for body in re.findall(r"\[([^\]]*)\]", pattern):
        for low, high in re.findall(r"(.)-(.)", body):
            if any(low <= c <= high for c in '"\\') or low < " ":
                return False
    return all(c >= " " for c in pattern)


def _unenforced(schema: Any, where: str) -> tuple[str, str] | None:
    """The first (path, keyword) the grammar would not enforce, walking every subschema."""
    if not isinstance(schema, dict):
        return None
    for keyword in schema:
        if keyword in UNENFORCED or (keyword == "pattern" and not safe_pattern(schema[keyword])):
            return where, keyword
    children: list[tuple[str, Any]] = []
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(f"{where}.{key}.{k}", v) for k, v in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(f"{where}.{key}.{i}", v) for i, v in enumerate(schema[key])]
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            children.append((f"{where}.{key}", schema[key]))
    for path, child in children:
        if found := _unenforced(child, path):
            return found
    return None
