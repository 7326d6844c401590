#!/usr/bin/env bash
# The wheels a bare GPU machine (Python 3.12, its own torch, no network) needs beyond its image, in
# .whl/ (ignored by git; carried in the first device call, installed by benchmarks/gpu_env.sh):
# Ray Serve (../shared/gpu/prepare-ray-wheels.sh), the gguf reader (real-model runs) and the
# openai client with what it needs there (bench_ruler.py --server). Run in the project root (OUT is
# relative to it):
#     bash benchmarks/gpu_wheels.sh [.whl]
set -euo pipefail
out=${1:-.whl}
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/../shared/gpu/prepare-ray-wheels.sh" "$out"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" gguf==0.19.0 openai==3.60.0 jiter==0.19.0 distro==1.9.0 \
  sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 2>&1 | grep -v WARNING || true
du -sh "$out"
