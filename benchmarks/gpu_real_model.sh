#!/usr/bin/env bash
# On a bare GPU machine: assemble a GGUF carried in chunks (/tmp/m/chunk*, see DEVELOPERS.md and
# ../shared/models/split-for-device.sh), check its md5, make `gguf` importable from carried wheels
# (.whl/), convert it once (RETROINFER_CACHE=/tmp/rc), then run what the arguments say:
#     bash benchmarks/gpu_real_model.sh MD5 -- python3 benchmarks/bench_ruler.py --model /tmp/model.gguf ...
set -euo pipefail
want=${1:?md5 of the whole file}; shift; [ "${1:-}" = "--" ] && shift
if [ ! -f /tmp/model.gguf ]; then cat /tmp/m/chunk* > /tmp/model.gguf; fi
got=$(md5sum < /tmp/model.gguf | cut -c1-32)
[ "$got" = "$want" ] || { echo "md5 $got, want $want" >&2; exit 1; }
source benchmarks/gpu_env.sh
export RETROINFER_CACHE=/tmp/rc
python3 -c "from retroinfer.models.catalog import resolve_model; print(resolve_model('/tmp/model.gguf'))" 2>&1 \
  | grep -v '%|'
"$@"
