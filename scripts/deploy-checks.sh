#!/usr/bin/env bash
# Validates the deployment files: docker/ (hadolint, checkov), k8s/ (yamllint,
# kustomize render of every overlay, kubernetes-validate --strict, offline schema
# and unknown-field checks of the Prometheus Operator and KEDA resources, checkov),
# the alerts (promtool check + unit tests) and the Grafana dashboard's queries
# (promtool), and that all of them agree with each other and with the code.
#
# Installs what it needs, quietly and idempotently, under scripts/deploy-checks/:
# Python tools in .venv (requirements.txt), npm packages in node_modules
# (package-lock.json), promtool in .tools (from Debian's `prometheus` package,
# extracted, so that no Prometheus server is installed or started). Needs python3
# (>= 3.9) with venv, node (>= 20) and npm, and apt-get for the first run.
#
#   scripts/deploy-checks.sh            # VERBOSE=1 shows every tool's output
#
# Exit status: 0 when every check passes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/deploy-checks"
VENV="$HERE/.venv"
TOOLS="$HERE/.tools"
# The oldest Kubernetes the manifests support (native gRPC probes are GA in
# 1.27) and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.27.0 1.37.0)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RENDER="$WORK/render"
mkdir -p "$RENDER"
# Lines "WARN ..." and "SKIP ..." that steps leave for the final summary.
NOTES="$WORK/notes"
: >"$NOTES"

SUMMARY=()
FAILED=0
STARTED=$(date +%s.%N)

# run_step NAME COMMAND...: runs COMMAND (with errexit, in a subshell) with its
# output in a log; prints one line (status, seconds, name, the log's last line),
# and the log itself on failure. Sets STEP_OK to 1 or 0; never fails itself, and
# must not be called as a condition (`if`, `||`): bash would switch errexit off
# inside COMMAND.
run_step() {
  local name="$1"
  shift
  local log="$WORK/step.log" t0 t1 rc status secs note line
  t0=$(date +%s.%N)
  set +e
  (
    set -e
    "$@"
  ) >"$log" 2>&1
  rc=$?
  set -e
  t1=$(date +%s.%N)
  if [[ $rc == 0 ]]; then status=ok STEP_OK=1; else status=FAIL STEP_OK=0 FAILED=$((FAILED + 1)); fi
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  note=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c 1-90 || true)
  line=$(printf '%-4s %6ss  %-44s %s' "$status" "$secs" "$name" "$note")
  echo "$line"
  if [[ $status == FAIL || ${VERBOSE:-0} == 1 ]]; then
    sed 's/^/      | /' "$log"
  fi
  SUMMARY+=("$line")
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
    echo "need root for: $*" >&2
    return 1
  fi
}

# ---------------------------------------------------------------- setup

setup_python() {
  local want
  want=$(sha "$HERE/requirements.txt")
  if [[ -x $VENV/bin/python && -f $VENV/.stamp && $(cat "$VENV/.stamp") == "$want" ]]; then
    echo "up to date: $(cd "$HERE" && grep -v '^#' requirements.txt | tr '\n' ' ')"
    return
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$HERE/requirements.txt"
  echo "$want" >"$VENV/.stamp"
  echo "installed: $(cd "$HERE" && grep -v '^#' requirements.txt | tr '\n' ' ')"
}

setup_node() {
  command -v node >/dev/null || { echo "node not found (need >= 20)"; return 1; }
  local want
  want=$(sha "$HERE/package-lock.json")
  if [[ -f $HERE/node_modules/.stamp && $(cat "$HERE/node_modules/.stamp") == "$want" ]]; then
    echo "up to date (node $(node --version))"
    return
  fi
  # The @kubernetes-models packages declare node >= 22 but run on 20: --loglevel=error
  # hides that engine warning.
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$HERE/node_modules/.stamp"
  echo "installed from package-lock.json (node $(node --version))"
}

setup_promtool() {
  if [[ -x $TOOLS/bin/promtool ]]; then
    "$TOOLS/bin/promtool" --version 2>&1 | head -n 1
    return
  fi
  command -v apt-get >/dev/null || { echo "apt-get not found: cannot fetch promtool"; return 1; }
  local deb="$WORK/deb"
  mkdir -p "$deb" "$TOOLS/bin"
  # Package lists missing or stale (the listed version gone from the mirror):
  # update them and try once more.
  if ! (cd "$deb" && apt-get download -qq prometheus 2>/dev/null); then
    as_root apt-get update -qq
    (cd "$deb" && apt-get download -qq prometheus 2>&1 | grep -v 'unsandboxed' || true)
  fi
  compgen -G "$deb/prometheus_*.deb" >/dev/null || { echo "apt-get download prometheus failed"; return 1; }
  dpkg-deb -x "$deb"/prometheus_*.deb "$deb/x"
  install -m 0755 "$deb/x/usr/bin/promtool" "$TOOLS/bin/promtool"
  "$TOOLS/bin/promtool" --version 2>&1 | head -n 1
}

# ---------------------------------------------------------------- checks

check_hadolint() {
  "$VENV/bin/hadolint" --no-color --failure-threshold info "$ROOT/docker/Dockerfile" "$ROOT/docker/Dockerfile.cpu"
  # Rules ignored inline, each with its reason in the comment above it.
  (cd "$ROOT" && grep -n 'hadolint ignore=' docker/Dockerfile docker/Dockerfile.cpu || true) |
    sed 's/^\([^:]*:[0-9]*\):.*hadolint ignore=\(.*\)$/SKIP hadolint \2 (\1)/' >>"$NOTES"
  echo "docker/Dockerfile, docker/Dockerfile.cpu: clean"
}

# checkov: on failure the failed checks, else its summary line. Skipped checks are
# justified where they are skipped (`checkov:skip=ID: reason` comments); they go
# to the final summary with their reason.
checkov_run() {
  local out="$WORK/checkov.txt" rc=0
  "$VENV/bin/checkov" --skip-download --compact "$@" >"$out" 2>&1 || rc=$?
  awk -v root="$ROOT" '/^Check: /   { id = $2; sub(/:$/, "", id) }
       /SKIPPED for resource:/ { res = $0; sub(/.*SKIPPED for resource: /, "", res); sub(/\.$/, "", res); sub(root "/", "", res) }
       /Suppress comment:/ { c = $0; sub(/.*Suppress comment: */, "", c); print "SKIP " id " (" res "): " c }' \
    "$out" >>"$NOTES"
  if [[ $rc != 0 ]]; then
    awk '/^Check: / { if (keep) print blk; blk = $0; keep = 0; next }
         { blk = blk "\n" $0; if (/FAILED for resource/) keep = 1 }
         END { if (keep) print blk }' "$out"
    grep -h 'Passed checks' "$out" || tail -n 20 "$out"
    return 1
  fi
  grep -h 'Passed checks' "$out" | tr -s ' ' | paste -sd ';' -
}

check_checkov_docker() {
  checkov_run --framework dockerfile -f "$ROOT/docker/Dockerfile" -f "$ROOT/docker/Dockerfile.cpu"
}

check_yamllint() {
  "$VENV/bin/yamllint" --strict -c "$ROOT/k8s/.yamllint" -f parsable "$ROOT/k8s"
  echo "$(find "$ROOT/k8s" -name '*.yaml' -o -name '.yamllint' | wc -l) files clean"
}

render() {
  local overlay="$1"
  "$VENV/bin/kubectl" kustomize "$ROOT/k8s/overlays/$overlay" >"$RENDER/$overlay.yaml"
  echo "$(grep -c '^kind:' "$RENDER/$overlay.yaml") resources: $(grep '^kind:' "$RENDER/$overlay.yaml" |
    awk '{print $2}' | sort | uniq -c | awk '{printf "%s%s", (NR>1?", ":""), $2 ($1>1?" x"$1:"")}')"
}

# kubernetes-validate --strict (unknown fields are errors) for the built-in kinds.
# It only warns on kinds it has no schema for; that is fine for the custom
# resources (checked by validate-crds.mjs) but not for a built-in apiVersion.
check_kubernetes_validate() {
  local overlay="$1" version out bad=0
  for version in "${K8S_VERSIONS[@]}"; do
    out="$WORK/kv.txt"
    if ! "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" - <"$RENDER/$overlay.yaml" >"$out" 2>&1; then
      grep -v "Couldn't find schema" "$out" || true
      bad=1
    fi
    while read -r kind api; do
      local group="${api%%/*}"
      if [[ $api != */* || $group != *.* || $group == *.k8s.io ]]; then
        echo "ERROR no schema for built-in $kind $api in Kubernetes $version"
        bad=1
      fi
    done < <(sed -n "s/.*Couldn't find schema for kind \([A-Za-z]*\) with api version \([^ ]*\) .*/\1 \2/p" "$out")
  done
  [[ $bad == 0 ]] && echo "built-in kinds valid (strict) for Kubernetes ${K8S_VERSIONS[*]}"
  return "$bad"
}

check_crds() {
  node "$HERE/validate-crds.mjs" "$RENDER"/*.yaml
}

check_checkov_k8s() {
  checkov_run --framework kubernetes -d "$RENDER"
}

check_alerts() {
  local overlay n=0
  for overlay in "${OVERLAYS[@]}"; do
    local dir="$WORK/rules-$overlay"
    mkdir -p "$dir"
    "$VENV/bin/python" "$HERE/manifests.py" rules "$RENDER/$overlay.yaml" "$dir/fusion-serve.rules.yaml"
    "$TOOLS/bin/promtool" check rules "$dir/fusion-serve.rules.yaml"
    cp "$ROOT/k8s/monitoring/alerts.test.yaml" "$dir/"
    (cd "$dir" && "$TOOLS/bin/promtool" test rules alerts.test.yaml)
    n=$((n + 1))
  done
  echo "rules valid and $(grep -c '^  - name:' "$ROOT/k8s/monitoring/alerts.test.yaml") unit tests pass (x$n overlays)"
}

check_dashboard() {
  "$VENV/bin/python" "$HERE/manifests.py" dashboard "$ROOT/k8s/monitoring/grafana-dashboard.json" "$WORK/dashboard.rules.yaml"
  "$TOOLS/bin/promtool" check rules "$WORK/dashboard.rules.yaml"
  echo "$(grep -c 'record:' "$WORK/dashboard.rules.yaml") dashboard queries parse"
}

check_consistency() {
  "$VENV/bin/python" "$HERE/manifests.py" crosscheck "$ROOT" "$RENDER"/*.yaml | tee "$WORK/crosscheck.txt"
  grep '^WARN ' "$WORK/crosscheck.txt" >>"$NOTES" || true
}

# ---------------------------------------------------------------- main

cd "$ROOT"
echo "deploy checks in $ROOT"
echo "== setup"
setup_ok=1
run_step "python tools (venv)" setup_python
setup_ok=$((setup_ok & STEP_OK))
run_step "npm packages" setup_node
setup_ok=$((setup_ok & STEP_OK))
run_step "promtool" setup_promtool
setup_ok=$((setup_ok & STEP_OK))
if [[ $setup_ok == 0 ]]; then
  echo "setup failed: no checks run"
  exit 1
fi

mapfile -t ALL_OVERLAYS < <(find "$ROOT/k8s/overlays" -mindepth 2 -maxdepth 2 -name kustomization.yaml -printf '%h\n' |
  xargs -n 1 basename | sort)

echo "== checks"
run_step "hadolint: Dockerfiles" check_hadolint
run_step "checkov: Dockerfiles" check_checkov_docker
run_step "yamllint: k8s/" check_yamllint
OVERLAYS=()
for overlay in "${ALL_OVERLAYS[@]}"; do
  run_step "kustomize: overlays/$overlay" render "$overlay"
  if [[ $STEP_OK == 1 ]]; then OVERLAYS+=("$overlay"); else rm -f "$RENDER/$overlay.yaml"; fi
done
for overlay in "${OVERLAYS[@]}"; do
  run_step "kubernetes-validate --strict: $overlay" check_kubernetes_validate "$overlay"
done
if [[ ${#OVERLAYS[@]} -gt 0 ]]; then
  run_step "custom resources (schema + unknown fields)" check_crds
  run_step "checkov: rendered manifests" check_checkov_k8s
  run_step "promtool: alert rules + unit tests" check_alerts
  run_step "consistency: metrics, HPA, adapter, ports" check_consistency
fi
run_step "promtool: dashboard queries" check_dashboard

total=$(awk -v a="$STARTED" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
if [[ -s $NOTES ]]; then
  echo "== skipped checks and warnings"
  sed 's/^/  /' "$NOTES"
fi
if [[ $FAILED -gt 0 ]]; then
  echo "deploy checks: $FAILED of ${#SUMMARY[@]} steps failed (${total}s)"
  exit 1
fi
echo "deploy checks: all ${#SUMMARY[@]} steps passed (${total}s)"
