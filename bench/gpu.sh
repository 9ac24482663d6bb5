#!/usr/bin/env bash
# GPU check of the models (issue 15 item 8; bench/gpu.py says what it measures).
# At most 8 minutes on one GPU: the Python part is killed after GPU_BENCH_LIMIT_S
# (default 470 s) and fits its timed step counts into that limit less
# GPU_BENCH_MARGIN_S (default 40 s); a row whose steps were cut says scaled_from=.
# Results: key=value lines and $OUT/gpu.tsv, rewritten after every row (OUT defaults to
# build/gpu, which git ignores).
#   bench/gpu.sh                      # CUDA, grids 32 and 96, bf16
#   bench/gpu.sh --device cpu --tiny  # the same code path as a CPU dry run (about a minute)
#   bench/gpu.sh --wheels             # (here) download the wheels a bare GPU machine lacks
#
# On the lent GPU machine (its image: python3 = CPython 3.12 with a CUDA torch, numpy,
# scipy, pandas, safetensors, einops; no MONAI, no nibabel; dmriflow not installed):
#   1. here, once, in the repo root:  bench/gpu.sh --wheels
#      -> .whl/ (git-ignored) with monai and nibabel at requirements.lock's pins, pure-Python
#      wheels fetched with pip download --no-deps for cp312 / manylinux x86_64
#   2. the device tool's run:  command "bench/gpu.sh", carry [".whl"], timeout_s 540
# There this script takes python3 (no .venv travels; PYTHON= overrides), installs
# .whl/*.whl with pip --no-index --no-deps into build/gpu-env/site when the python
# lacks MONAI or nibabel, and, when dmriflow is not importable, puts build/gpu-env/links
# (dmriflow/{interfaces,pipelines,models} -> this tree) on PYTHONPATH: the working tree
# that travelled is what runs. $OUT there is the folder the tool brings back.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
wheels="$root/.whl"
scratch="$root/build/gpu-env"   # the carried wheels' install and the import links (git-ignored)
#: what a bare GPU image lacks of the models' imports (pinned by requirements.lock)
carried=(monai nibabel)

pin() {  # NAME -> NAME==VERSION as requirements.lock pins it
  grep -E -m1 "^$1==" "$root/requirements.lock" | sed -E 's/[[:space:]\\]+$//'
}

if [ "${1:-}" = "--wheels" ]; then
  mkdir -p "$wheels"
  for name in "${carried[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$wheels" "$(pin "$name")"
  done
  ls -l "$wheels"
  exit 0
fi

python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
if ! "$python" -c "import monai, nibabel" 2>/dev/null; then
  compgen -G "$wheels/*.whl" >/dev/null || {
    echo "error: $python lacks monai/nibabel and $wheels has no wheels (bench/gpu.sh --wheels)" >&2
    exit 2; }
  site="$scratch/site"
  rm -rf "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import dmriflow.models" 2>/dev/null; then
  links="$scratch/links"
  rm -rf "$links"
  mkdir -p "$links/dmriflow"   # a namespace package, as setup.cfg's package_dir maps it
  for layer in interfaces pipelines models; do ln -s "$root/$layer" "$links/dmriflow/$layer"; done
  export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
fi

limit="${GPU_BENCH_LIMIT_S:-470}"
device=(--device cuda)          # this script is the GPU check: no CUDA is an error
case " $* " in
  *" --device cpu "*) export CUDA_VISIBLE_DEVICES=""; device=() ;;  # the loops pick CUDA when visible
  *" --device "*) device=() ;;
esac
exec timeout --signal=TERM --kill-after=10 "$limit" \
  "$python" "$here/gpu.py" "${device[@]}" --budget-s "$((limit - ${GPU_BENCH_MARGIN_S:-40}))" \
  --out "${OUT:-build/gpu}" "$@"
