#!/usr/bin/env bash
# Issue 41's GPU checks in one run, for a lent GPU machine that has torch and triton but not the
# project's other packages:
#   - .whl/*.whl: the pure-Python and small packages healthfm_core imports (pydantic, meds, ...),
#     installed into /tmp/site;
#   - .whl/batches/hospital_native.pt: the native batch of benchmarks/gpu_train_step.py, written on
#     a CPU machine with --save-native-batch (the synthetic federation needs polars, flwr, hydra).
#   `make gpu-bundle` writes both.
# Each stage writes its log under $OUT (at most 8 files come back) and is cut at its own limit,
# so one slow stage cannot take the others' time. Stages: see STAGES below or pass names.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh                    # every stage
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh tests train       # some
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh compile           # torch.compile's rows (not by default)
set -u
OUT=${OUT:-/tmp/healthfm-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
BATCH=.whl/batches/hospital_native.pt

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # name limit_s command...: run, log to $OUT/name.log, print the log's end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $((SECONDS - start)) s"
}

run_tests() {
    PYTHONPATH=$PYTHONPATH:$PWD/tests stage tests 150 python3 -m pytest -q -p no:cacheprovider --noconftest -o addopts="" \
        tests/unit/test_ct_attention_kernel.py tests/unit/test_trainer_optimizer.py tests/unit/test_weight_cast.py \
        tests/unit/test_device_copy.py
    tail -n 15 "$OUT/tests.log"
}
run_attention() {  # the table: kernel against SDPA (FlexAttention: stage flex)
    stage attention 90 python3 benchmarks/ct_attention.py --impl kernel sdpa --n 1024 4096 16384 --d 64 --m 1 4
    stage attention 40 python3 benchmarks/ct_attention.py --impl kernel sdpa --n 4096 --d 128 --m 4
    grep -A12 "ratios measured" "$OUT/attention.log" | tail -n 24
}
run_flex() {
    stage flex 150 python3 benchmarks/ct_attention.py --impl kernel flex --n 4096 1024 --d 64 --m 4 1 --verbose
    grep -v "^\s*File\|^    " "$OUT/flex.log" | tail -n 30
}
run_tune() {
    stage tune 150 python3 benchmarks/ct_attention_tune.py --m 4 --grid sweep
    stage tune 40 python3 benchmarks/ct_attention_tune.py --m 1 --grid default
    if [ -d .whl/before/benchmarks ]; then  # the kernel before this change, same run, same card
        echo "== before (.whl/before)" >>"$OUT/tune.log"
        stage tune 60 python3 .whl/before/benchmarks/ct_attention_tune.py --m 4 1 --grid default
    fi
    grep -v "Warning\|_warn_once" "$OUT/tune.log" | tail -n 45
}
run_train() {
    stage train 150 python3 benchmarks/gpu_train_step.py --native-batch "$BATCH" --models small paper \
        --attention reference auto --shapes native --warmup 2 --repeats 3
    stage train 150 python3 benchmarks/gpu_train_step.py --native-batch "$BATCH" --models small paper \
        --attention auto --shapes 2048x8 --warmup 2 --repeats 3
    # The CPU estimate of the same step's launches on the same batch (benchmarks/gpu_launches_on_cpu.py,
    # what a session without a GPU counts): beside the profiler's, it calibrates that estimate.
    TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= stage train 240 python3 benchmarks/gpu_launches_on_cpu.py \
        --native-batch "$BATCH" --batch 8 --models small paper --d-model 0
    grep "^|\|device:\|out of memory\|Error\| | " "$OUT/train.log" | tail -n 48
}

run_compile() {  # the backbone under torch.compile beside eager (not in the default stages: compiles take minutes)
    stage compile 300 python3 benchmarks/gpu_train_step.py --native-batch "$BATCH" --models small paper \
        --attention auto --compile --shapes native 2048x8 --warmup 2 --repeats 3
    grep "^|\|device:\|out of memory\|Error" "$OUT/compile.log" | tail -n 40
}

STAGES=${*:-tests tune attention train flex}
for s in $STAGES; do
    "run_$s"
done
