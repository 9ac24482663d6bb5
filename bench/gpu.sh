#!/usr/bin/env bash
# GPU check of the models (issue 15 item 8; bench/gpu.py says what it measures).
# At most 8 minutes on one GPU: the Python part is killed after GPU_BENCH_LIMIT_S
# (default 470 s). Results: key=value lines and $OUT/gpu.tsv (OUT defaults to build/gpu, which git ignores).
#   bench/gpu.sh                      # CUDA, grids 32 and 96, bf16
#   bench/gpu.sh --device cpu --tiny  # the same code path as a CPU dry run (< 1 min)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
device=(--device cuda)          # this script is the GPU check: no CUDA is an error
case " $* " in
  *" --device cpu "*) export CUDA_VISIBLE_DEVICES=""; device=() ;;  # the loops pick CUDA when visible
  *" --device "*) device=() ;;
esac
exec timeout --signal=TERM --kill-after=10 "${GPU_BENCH_LIMIT_S:-470}" \
  "$python" "$here/gpu.py" "${device[@]}" --out "${OUT:-build/gpu}" "$@"
