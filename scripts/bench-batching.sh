#!/usr/bin/env bash
# Dynamic batching on vs off, one run on this machine. Builds release, starts two
# servers on the built-in model (batching on with the defaults; off with
# --max-batch-size 1), drives each with examples/loadgen (real av-digits pairs) at
# several concurrencies, and prints a markdown table side by side.
#
# Each measurement is split into ROUNDS rounds that alternate between the two
# servers, and the rounds are merged, so drift in the machine's load (other
# processes) hits both alike.
#
#   scripts/bench-batching.sh
#   CONCURRENCY="1 32" scripts/bench-batching.sh
#   ON_FLAGS="--max-batch-delay-us 2000" scripts/bench-batching.sh   # try a delay
#
# Needs cargo, python3 and curl. Environment: DATA (av-digits directory),
# CONCURRENCY, REQUESTS (per measurement; default scales with concurrency), ROUNDS,
# ON_FLAGS, OFF_FLAGS, BASE_PORT (four ports from it).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-../shared/data/av-digits}"
CONCURRENCY="${CONCURRENCY:-1 8 32 64}"
REQUESTS="${REQUESTS:-}"
ROUNDS="${ROUNDS:-3}"
ON_FLAGS="${ON_FLAGS:-}"
OFF_FLAGS="${OFF_FLAGS:---max-batch-size 1}"
BASE_PORT="${BASE_PORT:-50350}"

cargo build --release --locked --bin fusion-serve --example loadgen >&2
BIN=target/release/fusion-serve
LOADGEN=target/release/examples/loadgen
OUT="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# start NAME GRPC_PORT METRICS_PORT FLAGS...
start() {
  local name=$1 grpc=$2 metrics=$3
  shift 3
  "$BIN" serve --grpc-addr "127.0.0.1:$grpc" --metrics-addr "127.0.0.1:$metrics" "$@" \
    >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
}
# shellcheck disable=SC2086 # the flags are meant to split
start on $((BASE_PORT)) $((BASE_PORT + 1)) $ON_FLAGS
# shellcheck disable=SC2086
start off $((BASE_PORT + 2)) $((BASE_PORT + 3)) $OFF_FLAGS
port_of() { if [ "$1" = on ]; then echo "$BASE_PORT"; else echo $((BASE_PORT + 2)); fi; }

# loadgen waits for each server to be ready and warms it up.
for mode in on off; do
  "$LOADGEN" --server "http://127.0.0.1:$(port_of $mode)" --data "$DATA" --concurrency 4 \
    --requests 32 >/dev/null
done

requests_for() {
  if [ -n "$REQUESTS" ]; then echo "$REQUESTS"; return; fi
  case "$1" in
    1) echo 300 ;;
    2 | 4 | 8) echo 450 ;;
    *) echo 1050 ;;
  esac
}

for c in $CONCURRENCY; do
  n=$(( $(requests_for "$c") / ROUNDS ))
  for round in $(seq 1 "$ROUNDS"); do
    for mode in on off; do
      port=$(port_of $mode)
      run="$OUT/$mode-c$c-r$round"
      echo "== batching $mode, concurrency $c, round $round/$ROUNDS: $n requests" >&2
      curl -fsS "http://127.0.0.1:$((port + 1))/metrics" >"$run.before"
      "$LOADGEN" --server "http://127.0.0.1:$port" --data "$DATA" --concurrency "$c" \
        --requests "$n" --warmup "$c" --label "$mode" --raw-out "$run.raw" \
        | tail -n 1 | tee "$run.json" >&2
      curl -fsS "http://127.0.0.1:$((port + 1))/metrics" >"$run.after"
    done
  done
done

echo
echo "Batching on (${ON_FLAGS:-defaults}) vs off (${OFF_FLAGS}); $ROUNDS alternating rounds each;" \
  "$(nproc) CPUs; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 - "$OUT" <<'PY'
import glob, json, math, os, sys

out = sys.argv[1]

def metrics(path):
    values = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values

runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    base = path[: -len(".json")]
    r = json.load(open(path))
    key = (r["concurrency"], r["label"])
    agg = runs.setdefault(key, {"seconds": 0.0, "lat": [], "codes": {}, "sums": {}})
    agg["seconds"] += r["seconds"]
    for line in open(base + ".raw"):
        ms, code = line.split()
        agg["codes"][code] = agg["codes"].get(code, 0) + 1
        if code == "OK":
            agg["lat"].append(float(ms))
    before, after = metrics(base + ".before"), metrics(base + ".after")
    for name in after:
        if name.endswith("_sum") or name.endswith("_count"):
            agg["sums"][name] = agg["sums"].get(name, 0.0) + after[name] - before.get(name, 0.0)

def pct(lat, p):
    lat = sorted(lat)
    return lat[max(1, math.ceil(p / 100 * len(lat))) - 1] if lat else float("nan")

def mean(agg, name, scale=1.0):
    n = agg["sums"].get(name + "_count", 0.0)
    return agg["sums"].get(name + "_sum", 0.0) / n * scale if n else float("nan")

def row(agg):
    ok = agg["codes"].get("OK", 0)
    errors = ",".join(f"{k}:{v}" for k, v in sorted(agg["codes"].items()) if k != "OK") or "0"
    return {
        "rps": ok / agg["seconds"],
        "p50": pct(agg["lat"], 50),
        "p99": pct(agg["lat"], 99),
        "mean": sum(agg["lat"]) / max(1, len(agg["lat"])),
        "batch": mean(agg, "fusion_batch_size"),
        "forward": mean(agg, "fusion_inference_duration_seconds", 1e3),
        "errors": errors,
    }

print("| concurrency | req/s on | req/s off | speed-up | p50 ms on | p50 ms off | p99 ms on | p99 ms off | mean batch on | forward ms/batch on | forward ms/batch off | errors on / off |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for c in sorted({c for c, _ in runs}):
    on, off = row(runs[(c, "on")]), row(runs[(c, "off")])
    print(f"| {c} | {on['rps']:.1f} | {off['rps']:.1f} | {on['rps'] / off['rps']:.2f}x "
          f"| {on['p50']:.1f} | {off['p50']:.1f} | {on['p99']:.1f} | {off['p99']:.1f} "
          f"| {on['batch']:.1f} | {on['forward']:.1f} | {off['forward']:.1f} "
          f"| {on['errors']} / {off['errors']} |")
PY
echo
echo "per-round results: $OUT"
