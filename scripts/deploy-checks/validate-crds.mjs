// Offline validation of the custom resources (Prometheus Operator, KEDA) in rendered
// kustomize output, which kubernetes-validate has no schemas for.
//
//   node validate-crds.mjs RENDERED.yaml...
//
// Two checks per resource:
// 1. schema: the kubernetes-models class's validate() (JSON schema generated from the
//    CRD: types, enums, required fields, patterns);
// 2. unknown fields: those schemas allow any extra property, while the API server
//    rejects unknown fields (kubectl's default --validate=strict). Each resource is
//    written as a TypeScript object literal of the model's interface, and tsc's
//    excess-property check reports every field the CRD does not define.
// Any resource that is neither a built-in kind (left to kubernetes-validate) nor a
// kind known here fails, so no custom resource goes unchecked.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const here = dirname(fileURLToPath(import.meta.url));

// apiVersion/kind -> the model class and the module/interface tsc checks against.
const KINDS = {
  "monitoring.coreos.com/v1/ServiceMonitor": {
    model: ServiceMonitor,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
    iface: "IServiceMonitor",
  },
  "monitoring.coreos.com/v1/PrometheusRule": {
    model: PrometheusRule,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
    iface: "IPrometheusRule",
  },
  "keda.sh/v1alpha1/ScaledObject": {
    model: ScaledObject,
    module: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    iface: "IScaledObject",
  },
};

// Built-in API groups: "v1" (core) and *.k8s.io plus the unqualified groups.
function isBuiltIn(apiVersion) {
  if (!apiVersion.includes("/")) return true;
  const group = apiVersion.split("/")[0];
  return !group.includes(".") || group.endsWith(".k8s.io");
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate-crds.mjs RENDERED.yaml...");
  process.exit(2);
}

let failures = 0;
const failed = new Set();
function fail(where, msg) {
  console.error(`FAIL ${where}: ${msg}`);
  failed.add(where);
  failures++;
}
const checked = [];
const literals = []; // [{ where, start, end }] line ranges in the generated .ts
const tsLines = [];
const imports = new Set();

for (const file of files) {
  const source = basename(file);
  const docs = parseAllDocuments(readFileSync(file, "utf8"));
  for (const doc of docs) {
    if (doc.errors.length > 0) {
      fail(source, `YAML error: ${doc.errors[0].message}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj === null || obj === undefined) continue;
    const where = `${source}: ${obj.kind}/${obj.metadata?.name}`;
    if (isBuiltIn(obj.apiVersion ?? "")) continue;
    const kind = KINDS[`${obj.apiVersion}/${obj.kind}`];
    if (!kind) {
      fail(where, `no schema known for ${obj.apiVersion} ${obj.kind}`);
      continue;
    }
    try {
      new kind.model(obj).validate();
    } catch (e) {
      fail(where, e.message);
    }
    imports.add(`import type { ${kind.iface} } from "${kind.module}";`);
    const start = tsLines.length + 1;
    const body = JSON.stringify(obj, null, 2).split("\n");
    tsLines.push(`export const r${literals.length}: ${kind.iface} = ${body[0]}`, ...body.slice(1));
    tsLines[tsLines.length - 1] += ";";
    literals.push({ where, start, end: tsLines.length });
    checked.push(where);
  }
}

if (literals.length > 0) {
  // Written next to node_modules so that the packages resolve.
  const dir = mkdtempSync(join(here, ".tsc-"));
  const header = [...imports];
  const offset = header.length;
  writeFileSync(join(dir, "resources.ts"), [...header, ...tsLines, ""].join("\n"));
  const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
  try {
    execFileSync(
      process.execPath,
      [tsc, "--noEmit", "--strict", "--skipLibCheck", "--target", "es2022",
        "--module", "nodenext", "--moduleResolution", "nodenext", "resources.ts"],
      { cwd: dir, encoding: "utf8", stdio: "pipe" },
    );
  } catch (e) {
    const out = `${e.stdout ?? ""}${e.stderr ?? ""}`;
    const lines = out.split("\n").filter((l) => l.trim() !== "");
    for (const line of lines) {
      const m = line.match(/^resources\.ts\((\d+),\d+\): (?:error \w+: )?(.*)$/);
      if (!m) {
        fail("tsc", line);
        continue;
      }
      const n = Number(m[1]) - offset;
      const lit = literals.find((l) => n >= l.start && n <= l.end);
      const text = tsLines[n - 1]?.trim() ?? "";
      fail(lit ? lit.where : "?", `${m[2]} (at \`${text}\`)`);
    }
    if (lines.length === 0) {
      fail("tsc", `exited with ${e.status}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const where of checked) if (!failed.has(where)) console.log(`ok   ${where}`);
console.log(`${checked.length} custom resources checked, ${failures} problems`);
process.exit(failures === 0 ? 0 : 1);
