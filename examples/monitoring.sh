#!/usr/bin/env bash
# Prometheus (and Grafana) watching a local gradstream while a model trains.
#
# With Docker, the whole stack with the Grafana dashboard provisioned is one command:
#   docker compose -f deploy/compose.yaml up --build    # Grafana on http://127.0.0.1:3000
# Without Docker, this script runs `gradstream serve` and a `prometheus` binary from your
# package manager with the repository's config and alert rules (deploy/prometheus/), trains
# a model through the CLI, and asks Prometheus for its loss and step count. Point a Grafana
# at the Prometheus it starts and import deploy/grafana/dashboards/gradstream.json.
#
# Ports: GRADSTREAM_PORT (50051), GRADSTREAM_METRICS_PORT (9464), PROMETHEUS_PORT (9090).
# Run from the repository root with `gradstream` on PATH.
set -euo pipefail
repo=$(pwd)
port=${GRADSTREAM_PORT:-50051}
metrics=${GRADSTREAM_METRICS_PORT:-9464}
prom=${PROMETHEUS_PORT:-9090}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The repository's config scrapes localhost:9464; scrape every second here, on $metrics.
sed -e "s/localhost:9464/localhost:$metrics/" -e "s/scrape_interval: 15s/scrape_interval: 1s/" \
  "$repo/deploy/prometheus/prometheus.yml" > "$work/prometheus.yml"
cp "$repo/deploy/prometheus/rules.yml" "$work/"

gradstream serve --port "$port" --health-port -1 --metrics-port "$metrics" \
  --ready-file "$work/ready.json" 2> "$work/serve.log" &
pids+=($!)
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom" 2> "$work/prometheus.log" &
pids+=($!)
for _ in $(seq 600); do [[ -e "$work/ready.json" ]] && break; sleep 0.1; done

export GRADSTREAM_TARGET=127.0.0.1:$port
python -c "
import numpy as np
x = np.random.default_rng(0).uniform(-1, 1, (2000, 2))
np.savetxt('$work/data.csv', np.column_stack([x, x @ [3.0, -1.0]]), delimiter=',', fmt='%.6g')
"
gradstream create monitored --spec '{"architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
  "optimizer": {"kind": "sgd", "lr": 0.05}}'
gradstream train monitored "$work/data.csv" --batch-size 20 --epochs 5 --report-every 1 --quiet

query() {
  curl -s "http://127.0.0.1:$prom/api/v1/query" --data-urlencode "query=$1" |
    python -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
# Wait for a scrape after training: the step counter reaches the 500 steps trained.
for _ in $(seq 120); do
  steps=$(query 'gradstream_train_steps_total{model="monitored"}' 2>/dev/null || true)
  [[ "${steps%.*}" == 500 ]] && break
  sleep 0.5
done
echo "Prometheus sees model 'monitored' at ${steps:-no} steps, loss $(query 'gradstream_train_loss{model="monitored"}')"
echo "alert rules loaded: $(curl -s "http://127.0.0.1:$prom/api/v1/rules" | python -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')"
gradstream delete monitored
