#!/usr/bin/env bash
# What only a GPU can show, in one device call of at most 9 minutes (535 s of part limits) (a lease is 15 minutes
# with the start): the gpu-marked tests with the kernels' default tuning, the attention rows
# benchmarks/RESULTS.md still lacks, and the 350M train step with each attention at a
# micro-batch where xla fits. Each part has its own time limit, so what finished comes back.
#
#   bash benchmarks/gpu_checks.sh            # results under $OUT (the device tool's), else gpu_out/
#   SMOKE=1 bash benchmarks/gpu_checks.sh    # the same parts at toy sizes (the plumbing, on a CPU)
#
# Carry the gin-config wheel in .whl (benchmarks/RESULTS.md, "Train-step benchmarks"); it is
# installed from there. Writes three files: log.txt (every part's output), summary.txt (one
# line per part: its exit status and seconds) and rows.md (the table rows to review and move
# into RESULTS.md).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
: > "$out/log.txt"; : > "$out/summary.txt"; : > "$out/rows.md"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log it, note how it ended
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" >> "$out/log.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
}

if [ "${SMOKE:-0}" = 1 ]; then
  attn=(--iters=1 --warmup=0 --tokens=512); d64=256; d128=256; d128_long=256; long_impl=xla
  step=(--seq_len=64 --steps=1 --warmup=1); model=(); small=2; large=2; impls=xla
else
  attn=(--iters=5 --warmup=1); d64=2048,4096,8192,16384; d128=8192; d128_long=16384
  long_impl=pallas_gpu; impls=xla,cudnn
  step=(--seq_len=2048 --steps=5 --warmup=2 --dtype=bfloat16)
  model=(--gin_file=models/350m.gin); small=2; large=8
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/log.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$out/log.txt" 2>&1

# 1. Correctness with the swept default tiles (issue 11: outputs and dq, dk, dv within 2e-2).
part kernel_tests 130 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu_kernels.py tests/test_gpu.py
part model_tests 70 python3 -m pytest -q -p no:cacheprovider -m "gpu or slow" \
    -k "pallas_gpu or cudnn or xla" tests/test_model.py
# 2. The attention rows still missing: D=128 T=8k prefix / ALiBi / packed / all for xla and
#    cudnn, D=128 T=16k `all` for pallas_gpu, D=64 prefix / ALiBi / packed for every impl.
part attention_d128 70 python3 benchmarks/attention.py "${attn[@]}" --dims=128 --lengths=$d128 \
    --features=prefix,alibi,packed,all --impls=$impls --results="$out/rows.md"
part attention_d128_long 35 python3 benchmarks/attention.py "${attn[@]}" --dims=128 \
    --lengths=$d128_long --features=all --impls=$long_impl --results="$out/rows.md"
part attention_d64 80 python3 benchmarks/attention.py "${attn[@]}" --dims=64 --lengths=$d64 \
    --features=prefix,alibi,packed --results="$out/rows.md"
# 3. The 350M train step, xla against pallas_gpu at a micro-batch where xla fits, then
#    pallas_gpu at the micro-batch of the RESULTS.md row (xla does not fit it).
for impl in xla pallas_gpu; do
  part "train_step_${impl}_micro$small" 50 python3 benchmarks/train_step.py "${model[@]}" \
      "${step[@]}" --micro_batch=$small --gin="ModelConfig.attention_impl='$impl'" \
      --results="$out/rows.md"
done
part "train_step_pallas_gpu_micro$large" 50 python3 benchmarks/train_step.py "${model[@]}" \
    "${step[@]}" --micro_batch=$large --gin="ModelConfig.attention_impl='pallas_gpu'" \
    --results="$out/rows.md"
echo "total ${SECONDS}s" | tee -a "$out/summary.txt"
