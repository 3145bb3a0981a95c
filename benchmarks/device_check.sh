#!/usr/bin/env bash
# One-shot device check for the first lent GPU: every CUDA test and every GPU benchmark, one
# JSON + one Markdown table (benchmarks/device_check.py). Under 8 minutes on one H200.
#
#   bash benchmarks/device_check.sh --fetch-wheels   # HERE, once: pvapy for the GPU image into .whl/
#   bash benchmarks/device_check.sh                  # THERE: the device tool's run, carry [".whl"]
#   bash benchmarks/device_check.sh --cpu            # anywhere (CI): no GPU work, a few seconds
#
# Options: --cpu | --out DIR (default $OUT, else ./device_check_out) | --budget SECONDS (GPU steps,
# default 450) | --fetch-wheels. PYTHON=... picks the interpreter (default: python3 on the GPU
# image, the project's .venv here for --cpu).
#
# A bare GPU image lacks pvapy (the device README's package list): it is carried as a cp312 wheel in
# .whl/ (git-ignored) and installed into /tmp/site. The project itself runs from the tree
# (PYTHONPATH). EPICS stays on loopback.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
out=""
budget=450
fetch=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --out) out="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --fetch-wheels) fetch=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ "$mode" = cpu ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi

if [ "$fetch" = 1 ]; then
  # the GPU image: Python 3.12, x86-64, numpy already there; pvapy needs only numpy
  mkdir -p .whl
  exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "pvapy==5.6.0"
fi

# EPICS PVA/CA on loopback only (the same values as /work/shared/epics-loopback.env)
export EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1 EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1 \
  EPICS_PVAS_AUTO_BEACON_ADDR_LIST=NO EPICS_PVAS_BEACON_ADDR_LIST=127.0.0.1 \
  EPICS_CA_AUTO_ADDR_LIST=NO EPICS_CA_ADDR_LIST=127.0.0.1
for f in ../shared/epics-loopback.env shared/epics-loopback.env; do
  if [ -f "$f" ]; then set -a; . "$f"; set +a; break; fi
done

if [ "$mode" = gpu ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
      || echo "device_check.sh: installing the carried wheels failed; PVA steps will be skipped" >&2
  else
    echo "device_check.sh: no .whl/ (run --fetch-wheels here and carry .whl); PVA steps need pvapy" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

cmd="bash benchmarks/device_check.sh"
[ "$mode" = cpu ] && cmd="$cmd --cpu"
args=(--mode "$mode" --budget "$budget" --command "$cmd")
[ -n "$out" ] && args+=(--out "$out")
exec "$py" benchmarks/device_check.py "${args[@]}"
