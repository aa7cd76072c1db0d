#!/usr/bin/env bash
# GPU checks (issue 5), one prepared run of about 6 minutes on an H100/H200; prints everything.
#   1. the CUDA tests (they skip on CPU)
#   2. the benchmark, per step on synthetic batches: resnet50 at 224 px, batch 64 (targets: agp global <= 1.05x a
#      dense step, steady <= 1.01x), and resnet18 at 64 px, batch 64 (the anchor of issue 5)
#   3. the selection micro-benchmark over 100M scores (target: <= 2 ms)
#   4. re-masking alone, timed with CUDA events against a plain dense step
#   5. with GPU_CHECK_DEMO=1, the main job with its defaults on CUDA (accuracy per schedule)
# Usage: bash scripts/gpu_check.sh [output folder]   (JSON copies of the results land there when given)
# Where fastai is missing (the lent machines have torch but not fastai), wheels in .whl/ are installed first.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/gpu_check}"
mkdir -p "$out"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import fastai" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || status=1
fi

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python3 -c "import torch, fastai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'fastai', fastai.__version__,
           'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" || status=1

step "CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda or regrow or lowest or bracket or selection" tests/test_sparsifier.py tests/test_edge_cases.py tests/test_bench.py \
    tests/test_callback.py 2>&1 | tail -n 25 || status=1

bench() {  # name, then the bench's arguments
  local name=$1; shift
  step "bench $name"
  timeout 200 python3 -m fasterai_sched.bench --device cuda --mode step "$@" --json > "$out/bench_$name.json" \
    && python3 -c "import json, fasterai_sched.bench as b; print(b.format_train(json.load(open('$out/bench_$name.json'))))" \
    || status=1
}
bench resnet50_224 --arch resnet50 --size 224 --bs 64 --steps 100 --repeats 5 --variants "dense,agp local,agp global,steady"
bench resnet18_64 --arch resnet18 --size 64 --bs 64 --steps 150 --repeats 5 --variants "dense,agp local,agp global,steady"

step "selection over 100M scores"
timeout 60 python3 -m fasterai_sched.bench select --device cuda --n 100000000 --repeats 20 --json > "$out/select.json" \
  && python3 -c "import json, fasterai_sched.bench as b; print(b.format_select(json.load(open('$out/select.json'))))" \
  || status=1

step "re-masking alone (CUDA events)"
for a in "resnet50 224" "resnet18 64"; do timeout 60 python3 scripts/gpu_apply_cost.py $a || status=1; done

if [ "${GPU_CHECK_DEMO:-0}" = 1 ]; then
  step "main job, defaults, on CUDA"
  timeout 150 python3 -m fasterai_sched --device cuda --pretrained no --out /tmp/demo_out 2>&1 \
    | grep -v "^\s*$" | tail -n 40 || status=1
fi

step "done, status $status"
exit $status
