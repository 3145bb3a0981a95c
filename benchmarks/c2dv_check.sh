#!/usr/bin/env bash
# c2dataviewer (c2dv) against a live PeakNetImageProcessor output channel, under Xvfb, on loopback.
# Counts c2dv's "Invalid data/color mode data" errors and takes a screenshot. A manual check (not
# in CI): it needs c2dataviewer in its own venv, Xvfb, xwd and ImageMagick (docs/PROCESSORS.md).
#
#   benchmarks/c2dv_check.sh OUT_DIR DATA_DIR [forward_images] [output_image] [min_peaks]
#
# c2dv logs nothing below CRITICAL unless C2DV_LOG_LEVEL is set: this script sets ERROR.
# DATA_DIR: a simulated ePix10k2M dataset (peaknet-pva simulate --detector epix10k2m). Env:
# C2DV (default /tmp/c2dv-venv/bin/c2dv), SECS (c2dv run time, default 10), FPS (default 1),
# DISPLAY_NUM (default 97), GEOMETRY (default examples/geometry/epix10k2m.geom), CONVERT (ImageMagick).
# Prints "c2dv_invalid_data_errors=N" and writes OUT_DIR/{c2dv.log,c2dv.png,pk.log,replay.log}.
set -euo pipefail
OUT=${1:?usage: c2dv_check.sh OUT_DIR DATA_DIR [forward_images] [output_image] [min_peaks]}
DATA=${2:?DATA_DIR missing}
FWD=${3:-hits}
IMG=${4:-assembled}
MINP=${5:-10}
C2DV=${C2DV:-/tmp/c2dv-venv/bin/c2dv}
SECS=${SECS:-10}
FPS=${FPS:-1}
DISP=${DISPLAY_NUM:-97}
GEOMETRY=${GEOMETRY:-examples/geometry/epix10k2m.geom}
CONVERT=${CONVERT:-$( [ -x /usr/bin/convert ] && echo /usr/bin/convert || echo convert )}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.venv/bin
cd "$ROOT"
mkdir -p "$OUT"
# loopback only (the project's file if there is one, else peaknet_pva.loopback's values)
if [ -f "$ROOT/../shared/epics-loopback.env" ]; then set -a; . "$ROOT/../shared/epics-loopback.env"; set +a
else eval "$("$BIN/python" -c 'from peaknet_pva.loopback import loopback_env as e
for k, v in e().items():
    print(f"export {k}={v!r}") if k.startswith("EPICS") else None')"; fi
TAG=c2dv$$
PIDS=()
cleanup() {  # stop only what this script started, by PID
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

Xvfb ":$DISP" -screen 0 1400x1050x24 -nolisten tcp >"$OUT/xvfb.log" 2>&1 &
PIDS+=($!)
ARGS=$(printf '{"weights": "default", "device": "cpu", "geometry": "%s", "min_peaks": %s, "forward_images": "%s", "output_image": "%s", "photon_energy_ev": 9500}' \
  "$GEOMETRY" "$MINP" "$FWD" "$IMG")
timeout 600 "$BIN/pvapy-hpc-consumer" -dc -nc 1 -sqs 100 -rp 2 -ll warning -ic "$TAG:image" \
  -oc "$TAG:pk:*:output" -sc "$TAG:pk:*:status" -cc "$TAG:pk:*:control" \
  --processor-class peaknet_pva.PeakNetImageProcessor --processor-args "$ARGS" >"$OUT/pk.log" 2>&1 &
PIDS+=($!)
# the replay waits until the consumer's input monitor is connected, then streams in a loop
timeout 600 "$BIN/peaknet-pva" replay "$DATA" -c "$TAG:image" --fps "$FPS" --loop --runtime $((SECS + 200)) \
  --wait-connected "$TAG:pk:1:status" --wait-timeout 300 >"$OUT/replay.log" 2>&1 &
PIDS+=($!)
# c2dv starts as soon as the consumer hosts its output channel, and its "Auto" (black/white
# levels from the next new frame; c2dv's default is 0..1, and its AUTOGAIN=ENABLED setting crashes
# 1.15.4) is pressed before the first hit arrives
timeout 300 "$BIN/python" -c "
import sys
from peaknet_pva.pva.procs import wait_for_status
wait_for_status(['$TAG:pk:1:status'], timeout_s=290)"
DISPLAY=":$DISP" C2DV_LOG_LEVEL=${C2DV_LOG_LEVEL:-ERROR} timeout $((SECS + 400)) "$C2DV" --app image --pv "$TAG:pk:1:output" >"$OUT/c2dv.log" 2>&1 &
C2DV_PID=$!
PIDS+=($C2DV_PID)
sleep 6
if command -v xdotool >/dev/null; then DISPLAY=":$DISP" xdotool mousemove 1044 441 click 1 || true; fi
# then the run proper: SECS seconds of live frames after the first published output
timeout 300 "$BIN/python" - "$TAG:pk:1:output" <<'EOF'
import sys, time
import pvaccess as pva
ch = pva.Channel(sys.argv[1], pva.PVA)
deadline = time.monotonic() + 290
while time.monotonic() < deadline:
    try:
        if int(ch.get("field(uniqueId)")["uniqueId"]) > 0:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit("no output published")
EOF
sleep "$SECS"
xwd -root -display ":$DISP" -silent | "$CONVERT" xwd:- "$OUT/c2dv.png"
kill -TERM "$C2DV_PID" 2>/dev/null || true
sleep 1
echo "c2dv_invalid_data_errors=$(grep -c 'Invalid data/color mode data' "$OUT/c2dv.log" || true)"
echo "status: $("$BIN/python" -c "
import sys
from peaknet_pva.pva.procs import read_status
s = read_status('$TAG:pk:1:status')['userStats']
print({k: s[k] for k in ('nProcessed', 'nHits', 'nNotPublished', 'nImagesForwarded')})")"
