#!/usr/bin/env bash
# GPU checks (issue 5), one prepared run of about 5 minutes on an H100/H200; prints everything.
#   1. the test suite without the slow tests: the CUDA tests run, the rest passes as on CPU
#   2. the benchmark, per step on synthetic batches: resnet50 at 224 px, batch 64: dense, agp local and global,
#      and the steady state after one_shot (targets: agp global <= 1.05x a dense step, steady <= 1.01x)
#   3. the selection micro-benchmark over 100M scores (target: <= 2 ms)
# Usage: bash scripts/gpu_check.sh [output folder]   (JSON copies of the results land there when given)
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-}"
[ -n "$out" ] && mkdir -p "$out"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python -c "import torch, fastai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'fastai', fastai.__version__,
           'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" || status=1

step "tests (not slow)"
timeout 200 python -m pytest -q -m "not slow" -p no:cacheprovider tests 2>&1 | tail -n 25 || status=1

step "bench: resnet50 224 px, batch 64, per step"
timeout 180 python -m fasterai_sched.bench --device cuda --mode step --arch resnet50 --size 224 --bs 64 \
    --steps 30 --repeats 3 --variants "dense,agp local,agp global,steady" --json > /tmp/gpu_bench.json \
  && python -c "import json, fasterai_sched.bench as b; print(b.format_train(json.load(open('/tmp/gpu_bench.json'))))" \
  || status=1
[ -n "$out" ] && cp /tmp/gpu_bench.json "$out/" 2>/dev/null

step "selection over 100M scores"
timeout 60 python -m fasterai_sched.bench select --device cuda --n 100000000 --repeats 20 --json > /tmp/gpu_select.json \
  && python -c "import json, fasterai_sched.bench as b; print(b.format_select(json.load(open('/tmp/gpu_select.json'))))" \
  || status=1
[ -n "$out" ] && cp /tmp/gpu_select.json "$out/" 2>/dev/null

step "done, status $status"
exit $status
