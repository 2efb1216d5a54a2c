#!/usr/bin/env python3
"""Write kubeconform JSON schemas from sources that the Go module proxy serves.

Why: kubeconform downloads its schemas from the internet by default, which these
machines cannot reach. The same facts ship inside Go modules: Kubernetes' own OpenAPI
v2 document (`k8s.io/kubernetes/api/openapi-spec/swagger.json`) and the CRD YAML of
Istio (`istio.io/api/kubernetes/customresourcedefinitions.gen.yaml`), KEDA
(`github.com/kedacore/keda/v2/config/crd/bases`) and the Prometheus operator
(`example/prometheus-operator-crd`). This script turns them into one self-contained
schema per kind, laid out for the kubeconform template
`DIR/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json`.

Every schema is strict: an object that lists its properties rejects any other key
(unless the source says x-kubernetes-preserve-unknown-fields), so a misspelt field in
a manifest fails validation instead of being silently ignored by the API server.

usage: kube_schemas.py OUT_DIR --swagger swagger.json --crds FILE_OR_DIR...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

INT_OR_STRING = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
# Quantities are strings in the spec, but `cpu: 1` is a YAML integer and is accepted.
QUANTITY = {"anyOf": [{"type": "string"}, {"type": "number"}]}


def _strict(node: Any) -> Any:
    """Recursively close objects that declare properties; translate k8s extensions."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
        return dict(INT_OR_STRING, description=node.get("description", ""))
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _path(out: Path, group: str, version: str, kind: str) -> Path:
    # kubeconform's {{.Group}} is the part before '/', so "v1" for the core group.
    return out / (group or version) / f"{kind.lower()}_{version}.json"


def core_schemas(swagger: dict[str, Any], out: Path) -> int:
    defs: dict[str, Any] = swagger["definitions"]
    cache: dict[str, Any] = {}

    def resolve(node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(n, stack) for n in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name.endswith("api.resource.Quantity"):
                return QUANTITY
            if name in stack:  # recursive types (JSONSchemaProps): accept anything
                return {}
            if name not in cache:
                cache[name] = resolve(defs[name], (*stack, name))
            return cache[name]
        return {k: resolve(v, stack) for k, v in node.items()}

    count = 0
    for name, definition in defs.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if not name.rsplit(".", 1)[-1] == gvk["kind"] or name.endswith("List"):
                continue
            schema = _strict(resolve(definition, (name,)))
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            target = _path(out, gvk["group"], gvk["version"], gvk["kind"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(schema))
            count += 1
    return count


def crd_schemas(paths: list[Path], out: Path) -> int:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    count = 0
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                raw = (version.get("schema") or {}).get("openAPIV3Schema")
                if raw is None:
                    continue
                schema = _strict(raw)
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string"}, kind={"type": "string"},
                    metadata={"type": "object"},
                )
                schema["$schema"] = "http://json-schema.org/draft-07/schema#"
                target = _path(out, spec["group"], version["name"], spec["names"]["kind"])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(schema))
                count += 1
    return count


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--swagger", type=Path, required=True)
    ap.add_argument("--crds", type=Path, nargs="*", default=[])
    args = ap.parse_args(argv)
    n_core = core_schemas(json.loads(args.swagger.read_text()), args.out)
    n_crd = crd_schemas(args.crds, args.out)
    print(f"wrote {n_core} Kubernetes and {n_crd} CRD schemas to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
