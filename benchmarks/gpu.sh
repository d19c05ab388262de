#!/usr/bin/env bash
# The prepared GPU check, for a lent device machine (H100/H200): CUDA-marked tests,
# `gradstream bench --device cuda` for small, medium and large, then the CUDA-graph-captured
# step against the eager one (benchmarks/cuda_graph.py), and last torch.compile's
# reduce-overhead step. Under 6 minutes: each part has its own limit and gets no more than
# what is left of the script's; a part that fails or runs out of time is noted and the next
# one runs; the exit status is 1 if any did.
#
# Here (pip works): bash benchmarks/gpu.sh --fetch   puts the wheels the GPU image lacks in .whl/
# There (device run, carry .whl): bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gradstream-gpu}
# The GPU image has torch, numpy, grpcio and protobuf; the generated stubs need these at least.
WHEELS="grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.7.0
typing-inspection==0.4.2 typing-extensions==4.15.0 python-dotenv==1.2.2 prometheus-client==0.26.0
safetensors==0.8.0 pytest-timeout==2.4.0"
if [[ "${1:-}" == "--fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  exit 0
fi
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/proto:$PWD/client:$PWD/server:$PWD/benchmarks
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"
# Seconds since the script started by which every part has ended (bash counts SECONDS).
DEADLINE=345
failed=()
# part NAME LIMIT_S OUTPUT_FILE COMMAND...: COMMAND's output into $OUT/OUTPUT_FILE and here.
part() {
  local name=$1 limit=$2 out=$OUT/$3 rc=0
  shift 3
  local left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    echo "$name: not run, the script's time is spent" | tee "$out"
    failed+=("$name")
    return
  fi
  ((left < limit)) && limit=$left
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$out" || rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then
    echo "$name: stopped after its ${limit} s" | tee -a "$out"
  elif ((rc != 0)); then
    echo "$name: exit status $rc" | tee -a "$out"
  fi
  ((rc == 0)) || failed+=("$name")
}
part tests 90 tests.txt python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda
part bench 170 bench.txt python3 -m gradstream.bench.cli small medium large --device cuda \
  --duration 4 --repeat 1 --json "$OUT/bench.json"
part cuda-graph 45 cuda_graph.txt python3 benchmarks/cuda_graph.py small medium \
  --seconds 0.5 --json "$OUT/cuda_graph.json"
part compiled 60 cuda_graph_compiled.txt python3 benchmarks/cuda_graph.py medium --compile \
  --seconds 0.5 --json "$OUT/cuda_graph_compiled.json"
echo "gpu.sh: ${SECONDS} s; failed: ${failed[*]:-none}" | tee -a "$OUT/gpu.txt"
((${#failed[@]} == 0))
