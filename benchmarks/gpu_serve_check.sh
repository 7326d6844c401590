#!/usr/bin/env bash
# Issue 5's GPU check, on a bare GPU machine with .whl/ carried (Ray wheels):
# `serve run` of a random-weight Llama-3-8B-architecture model with wave attention, one streamed
# completion of a 32K-token prompt over HTTP, then the same request in process.
set -u
source benchmarks/gpu_env.sh
export PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled
mkdir -p /tmp/serve
cat > /tmp/serve/r8b.yaml <<'YAML'
applications:
  - name: retroinfer
    route_prefix: /
    import_path: retroinfer.deployments.app:build_app
    args:
      model: random:llama3-8b
      served_model_name: llama3-8b-random
      attention: wave
      dtype: bfloat16
      device: cuda
      num_replicas: 1
      gpus_per_replica: 1
      max_batch: 4
      max_model_len: 40000
YAML
( serve run /tmp/serve/r8b.yaml > /tmp/serve/serve.log 2>&1 & )
# /health answers 200 once the engine replica has loaded the model and run its warm-up
t0=$(date +%s)
for i in $(seq 1 200); do
  curl -sf localhost:8000/health >/dev/null 2>&1 && break
  sleep 2
done
echo "ready after $(( $(date +%s) - t0 )) s: $(curl -s localhost:8000/health)"
python3 benchmarks/bench_serve.py --url http://localhost:8000 --prompt-tokens 32000 --max-tokens 128 \
  --requests 3 --warmup 1 --concurrency 1 --token-ids --name serve_8b_wave_32k_v3 2>&1 | tail -4
serve shutdown -y >/dev/null 2>&1; ray stop --force >/dev/null 2>&1
grep -iE "error|Traceback" /tmp/serve/serve.log | head -5
# The same request in process, with the KV where the server keeps it (wave on a GPU defaults to
# offload): prefill time ~ TTFT, and the decode rate.
python3 benchmarks/bench_decode.py --model random:llama3-8b --attention wave --offload --context 32000 --batches 1 \
  --steps 127 --graphs on --name serve_8b_wave_offload_inprocess_v3 2>&1 | tail -3
