#!/usr/bin/env bash
# Issue 4's GPU runs on a bare GPU machine (results in benchmarks/results/, copied to $OUT when set):
#   bash benchmarks/gpu_offload_check.sh 1m      # 1M tokens, Qwen2.5-7B architecture, batch 1
#   bash benchmarks/gpu_offload_check.sh 120k    # Llama-3-8B at 120K: full attention vs RetroInfer
#   bash benchmarks/gpu_offload_check.sh sweep   # Llama-3-8B: full attention vs RetroInfer by context
# KV is synthesised straight into the cache (--synthesize): the prompts' prefill is not what is timed.
set -u
export PYTHONPATH=${PYTHONPATH:-}
source benchmarks/gpu_env.sh >/dev/null
export PYTHONUNBUFFERED=1
B="python3 benchmarks/bench_decode.py --steps 24 --synthesize"
W="--attention wave --offload --host-kv-gb 62"
case "${1:-sweep}" in
  1m)   # the default 5% GPU cache (with the kernel profile), half the pool cached, then "auto"
    timeout 220 $B --model random:qwen2.5-7b $W --context 1048576 --batches 1 --graphs both --profile \
      --name decode_1m_qwen7b_v5 | grep -v "^{"
    timeout 150 $B --model random:qwen2.5-7b $W --context 1048576 --batches 1 --graphs on --cache-fraction 0.5 \
      --cache-slot-rows 16 --warmup 40 --name decode_1m_qwen7b_cache50_v5 | grep -v "^{"
    timeout 200 $B --model random:qwen2.5-7b $W --context 1048576 --batches 1 --graphs on --cache-fraction auto \
      --warmup 60 --name decode_1m_qwen7b_cacheauto_v5 | grep -v "^{" ;;
  120k)
    timeout 80 $B --attention full --context 122880 --batches max --graphs on --name decode_120k_full_v3 | grep -v "^{"
    timeout 140 $B $W --context 122880 --batches max --graphs on --name decode_120k_wave_v3 | grep -v "^{" ;;
  sweep)
    timeout 150 $B --attention full --context 32768,65536,122880 --batches max --graphs on --name sweep_full \
      | grep -v "^{"
    timeout 300 $B $W --context 32768,65536,122880 --batches max --graphs both --name sweep_wave_offload \
      | grep -v "^{" ;;
esac
[ -n "${OUT:-}" ] && cp benchmarks/results/decode_1m_qwen7b_* benchmarks/results/decode_120k_* benchmarks/results/sweep_* \
  "$OUT"/ 2>/dev/null
true
