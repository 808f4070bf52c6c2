"""Helpers of scripts/deploy-checks.sh that read the rendered manifests.

  manifests.py rules RENDERED.yaml OUT.rules.yaml
      Writes the rule groups of the PrometheusRule in RENDERED.yaml as a plain
      Prometheus rules file (for promtool).
  manifests.py dashboard DASHBOARD.json OUT.rules.yaml
      Writes every PromQL query of the Grafana dashboard as a recording rule, with
      Grafana's variables replaced, so that promtool can parse them.
  manifests.py crosscheck REPO_ROOT RENDERED.yaml...
      Checks that the manifests agree with each other and with the code: metric
      names exist in src/telemetry/metrics.rs, the HPA's custom metrics are served
      by the prometheus-adapter rules, ports match the flags' defaults. Environment
      variables the binary does not declare (yet) are reported as warnings.
"""

import json
import re
import sys
from pathlib import Path

import yaml


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def cmd_rules(rendered, out):
    rules = [d for d in load_all(rendered) if d.get("kind") == "PrometheusRule"]
    if not rules:
        sys.exit(f"{rendered}: no PrometheusRule")
    groups = [g for r in rules for g in r["spec"]["groups"]]
    Path(out).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    print(f"{len(groups)} rule groups from {rendered}")


GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "fusion-serve",
    "${namespace}": "fusion-serve",
}


def dashboard_exprs(dashboard):
    def walk(panels):
        for p in panels:
            yield from walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield p.get("title", "?"), t["expr"]

    yield from walk(dashboard.get("panels", []))


def cmd_dashboard(path, out):
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs(dashboard)):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            sys.exit(f'{path}: panel "{title}": unknown variable in {expr}')
        rules.append({"record": f"dashboard:query_{i}", "expr": expr, "labels": {"panel": title}})
    if not rules:
        sys.exit(f"{path}: no queries")
    doc = {"groups": [{"name": "grafana-dashboard", "rules": rules}]}
    Path(out).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    print(f"{len(rules)} dashboard queries from {path}")


METRIC = re.compile(r"\bfusion_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def base_metric(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def cmd_crosscheck(root, rendered_files):
    root = Path(root)
    errors, warnings, notes = [], [], []

    metrics_rs = root / "src/telemetry/metrics.rs"
    known = None
    if metrics_rs.exists():
        known = set(re.findall(r'"(fusion_[a-z0-9_]+)"', metrics_rs.read_text(encoding="utf-8")))
    else:
        warnings.append(f"{metrics_rs} not found: metric names not checked against the code")

    adapter = yaml.safe_load((root / "k8s/monitoring/prometheus-adapter-rules.yaml").read_text(encoding="utf-8"))
    adapter_rules = adapter["rules"]["custom"]
    served = {r["name"]["as"]: r for r in adapter_rules}

    # Metric names used anywhere (alerts, dashboard, adapter, KEDA) -> where.
    used = {}

    def use(text, where):
        for m in METRIC.findall(text):
            if m in served:  # adapter output names are custom-metric names, not series
                continue
            used.setdefault(base_metric(m), set()).add(where)

    dashboard = json.loads((root / "k8s/monitoring/grafana-dashboard.json").read_text(encoding="utf-8"))
    for title, expr in dashboard_exprs(dashboard):
        use(expr, f"dashboard panel {title!r}")
    for r in adapter_rules:
        use(r["seriesQuery"], "prometheus-adapter rules")

    config_keys = set()
    for path in rendered_files:
        overlay = Path(path).stem
        docs = load_all(path)
        for d in docs:
            kind, name = d.get("kind"), d.get("metadata", {}).get("name")
            if kind == "PrometheusRule":
                for g in d["spec"]["groups"]:
                    for r in g["rules"]:
                        use(r["expr"], f"{overlay}: alert {r.get('alert') or r.get('record')}")
            elif kind == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    use(t.get("metadata", {}).get("query", ""), f"{overlay}: ScaledObject")
            elif kind == "HorizontalPodAutoscaler":
                for m in d["spec"].get("metrics", []):
                    if m["type"] == "Pods":
                        n = m["pods"]["metric"]["name"]
                        if n not in served:
                            errors.append(f"{overlay}: HPA metric {n} is not served by the prometheus-adapter rules")
                        else:
                            notes.append(f"{overlay}: HPA metric {n} <- adapter rule on {served[n]['seriesQuery']}")
            elif kind == "ConfigMap" and name.startswith("fusion-serve-config"):
                config_keys |= set(d.get("data", {}))
            elif kind == "Deployment":
                c = d["spec"]["template"]["spec"]["containers"][0]
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                if ports != {"grpc": 50051, "metrics": 9090}:
                    errors.append(f"{overlay}: container ports {ports}, expected grpc 50051, metrics 9090")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if c.get(probe, {}).get("grpc", {}).get("port") != 50051:
                        errors.append(f"{overlay}: {probe} is not a gRPC probe on 50051")

    if known is not None:
        missing = sorted(m for m in used if m not in known)
        for metric in missing:
            wheres = ", ".join(sorted(used[metric]))
            errors.append(f"metric {metric} is not defined in src/telemetry/metrics.rs (used by {wheres})")
        unused = sorted(known - set(used))
        notes.append(f"{len(used)} metric names used, {len(missing)} unknown to src/telemetry/metrics.rs"
                     + (f"; not shown anywhere: {', '.join(unused)}" if unused else ""))

    # Environment variables the binary reads: clap `env = "..."` in src/.
    declared = set()
    for rs in (root / "src").rglob("*.rs"):
        declared |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', rs.read_text(encoding="utf-8")))
    for key in sorted(config_keys):
        if key.startswith("FUSION_") and declared and key not in declared:
            warnings.append(f"ConfigMap sets {key}, which no clap flag in src/ declares (yet)")

    for n in notes:
        print(n)
    for w in warnings:
        print(f"WARN {w}")
    for e in errors:
        print(f"FAIL {e}")
    print(f"{len(errors)} problems, {len(warnings)} warnings")
    return 1 if errors else 0


def main(argv):
    if len(argv) >= 3 and argv[0] == "rules":
        return cmd_rules(argv[1], argv[2])
    if len(argv) >= 3 and argv[0] == "dashboard":
        return cmd_dashboard(argv[1], argv[2])
    if len(argv) >= 3 and argv[0] == "crosscheck":
        return cmd_crosscheck(argv[1], argv[2:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
