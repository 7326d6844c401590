#!/usr/bin/env bash
# Issue 4's GPU runs on a bare GPU machine (results in benchmarks/results/, copied to $OUT when set):
#   bash benchmarks/gpu_offload_check.sh 1m      # 1M tokens, Qwen2.5-7B architecture, batch 1
#   bash benchmarks/gpu_offload_check.sh sweep   # Llama-3-8B: full attention vs RetroInfer by context
# KV is synthesised straight into the cache (--synthesize): the prompts' prefill is not what is timed.
set -u
export PYTHONPATH=${PYTHONPATH:-}
source benchmarks/gpu_env.sh >/dev/null
export PYTHONUNBUFFERED=1
B="python3 benchmarks/bench_decode.py --steps 24 --synthesize"
case "${1:-sweep}" in
  1m)
    timeout 200 $B --model random:qwen2.5-7b --attention wave --offload --host-kv-gb 62 --context 1048576 \
      --batches 1 --graphs both --name decode_1m_qwen7b_cache | grep -v "^{" ;;
  sweep)
    timeout 150 $B --attention full --context 32768,65536,122880 --batches max --graphs on --name sweep_full \
      | grep -v "^{"
    timeout 300 $B --attention wave --offload --host-kv-gb 62 --context 32768,65536,122880 --batches max \
      --graphs both --name sweep_wave_offload | grep -v "^{" ;;
esac
[ -n "${OUT:-}" ] && cp benchmarks/results/decode_1m_qwen7b_cache_* benchmarks/results/sweep_* "$OUT"/ 2>/dev/null
true
