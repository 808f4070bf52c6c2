#!/usr/bin/env bash
# Starts the binary given as $1 on the built-in model and drives it with grpcurl and
# the generated Python client. Needs grpcurl and grpcio on PATH.
set -euo pipefail
BIN="$1"
PORT="${FUSION_E2E_PORT:-50151}"
METRICS="${FUSION_E2E_METRICS:-19190}"
ADDR="127.0.0.1:$PORT"
LOG="$(mktemp)"
"$BIN" serve --grpc-addr "$ADDR" --metrics-addr "127.0.0.1:$METRICS" >"$LOG" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 240); do
  if grpcurl -plaintext -d '{"service":""}' "$ADDR" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
    if ! grpcurl -plaintext -d '{"service":""}' "$ADDR" grpc.health.v1.Health/Check | grep -q NOT_SERVING; then
      break
    fi
  fi
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "server exited"; exit 1; }
  sleep 0.5
done

echo "--- grpcurl list (reflection)"
# (tee to a file: `tee /dev/stderr` would truncate a log that stdout and stderr share)
grpcurl -plaintext "$ADDR" list | tee "$LOG.list"
grep -qx 'fusion.v1.FusionService' "$LOG.list"
echo "--- grpcurl describe"
grpcurl -plaintext "$ADDR" describe fusion.v1.FusionService.Predict
echo "--- health"
grpcurl -plaintext -d '{"service":""}' "$ADDR" grpc.health.v1.Health/Check | tee "$LOG.health"
grep -q '"SERVING"' "$LOG.health"
echo "--- Predict with a real PNG + WAV"
python3 scripts/av_pair_json.py --split test --rows 0 \
  | grpcurl -plaintext -d @ "$ADDR" fusion.v1.FusionService/Predict | tee "$LOG.predict"
grep -q '"modelVersion"' "$LOG.predict"
grep -q '"probabilities"' "$LOG.predict"
echo "--- a bad request gets INVALID_ARGUMENT"
if grpcurl -plaintext -d '{"samples":[]}' "$ADDR" fusion.v1.FusionService/Predict 2>"$LOG.err"; then
  echo "an empty request succeeded"; exit 1
fi
cat "$LOG.err"; grep -q 'InvalidArgument' "$LOG.err"
echo "--- Python client (stubs generated from proto/)"
python3 examples/python/client.py --server "$ADDR" --rows 0 1 2 | tee "$LOG.py"
grep -q 'model_version' "$LOG.py"
grep -q 'INVALID_ARGUMENT' "$LOG.py"
echo "--- metrics exposition"
curl -fsS "http://127.0.0.1:$METRICS/metrics" > "$LOG.metrics"
grep -q '^fusion_requests_total' "$LOG.metrics"
if command -v promtool >/dev/null; then promtool check metrics < "$LOG.metrics"; fi
echo "--- SIGTERM: clean exit"
kill -TERM "$PID"
wait "$PID"
trap - EXIT
echo "e2e OK"
