#!/usr/bin/env bash
# The four-terminal pvapy flow of seed 004 (PtychoNN on the pvapy streaming framework), with
# PeakNet instead of PtychoNN and a CXI writer set instead of TIFF files:
#
#   terminal 1  PeakNet consumers      pvapy:image        -> peaknet:<k>:output  (k = 1..NC)
#   terminal 2  CXI writer consumers   peaknet:<k>:output -> OUT/cxi/*.cxi  (writer k reads consumer k)
#   terminal 3  the source             pvapy-ad-sim-server (or peaknet-pva replay) on pvapy:image
#   terminal 4  the viewer             c2dv --app image --pv peaknet:1:output
#
# Run it whole from the repository root (it starts, waits, stops and summarises, all bounded):
#
#     bash examples/four_terminals.sh                  # CPU, 2 consumers, 10 fps for 60 s
#     RUNTIME=20 FPS=5 bash examples/four_terminals.sh
#     SOURCE=replay bash examples/four_terminals.sh    # per-frame PhotonEnergy from the simulator
#     ARGS_FILE=examples/args/gpu-4consumers.json NC=4 DU=8 FPS=500 bash examples/four_terminals.sh
#     DETECTOR=epix10k2m ARGS_FILE=examples/args/epix10k2m.json OUT=out/ft-epix bash examples/four_terminals.sh
#     PREFIX=me: bash examples/four_terminals.sh          # channel names me:pvapy:image, me:peaknet:<k>:output, ...
#
# The "terminal N" commands below can also be typed into separate terminals, with the variables they
# use set by hand (docs/OPERATIONS.md section 1 has them written out). DETECTOR needs the matching
# ARGS_FILE (panel_shape) and a fresh OUT (the simulated frames are reused when OUT/sim exists).
# It runs on loopback only: it sources the loopback EPICS environment first. Logs go to OUT/logs.
# Stop early with Ctrl-C: the script sends SIGINT to what it started (SIGTERM would leave pvapy's
# forked consumers running) and waits for them to drain.

set -uo pipefail
set -m  # job control: background jobs keep SIGINT (a non-interactive shell would ignore it for them)
cd "$(dirname "$0")/.."

# --- environment: EPICS on loopback ---------------------------------------------------------------
EPICS_ENV="${EPICS_ENV:-../shared/epics-loopback.env}"
if [ -f "$EPICS_ENV" ]; then set -a; . "$EPICS_ENV"; set +a; fi
: "${EPICS_PVA_AUTO_ADDR_LIST:=NO}" "${EPICS_PVA_ADDR_LIST:=127.0.0.1}"
: "${EPICS_PVAS_INTF_ADDR_LIST:=127.0.0.1}" "${EPICS_PVAS_AUTO_BEACON_ADDR_LIST:=NO}"
: "${EPICS_PVAS_BEACON_ADDR_LIST:=127.0.0.1}" "${EPICS_CA_AUTO_ADDR_LIST:=NO}" "${EPICS_CA_ADDR_LIST:=127.0.0.1}"
export EPICS_PVA_AUTO_ADDR_LIST EPICS_PVA_ADDR_LIST EPICS_PVAS_INTF_ADDR_LIST \
       EPICS_PVAS_AUTO_BEACON_ADDR_LIST EPICS_PVAS_BEACON_ADDR_LIST EPICS_CA_AUTO_ADDR_LIST EPICS_CA_ADDR_LIST

# --- knobs ------------------------------------------------------------------------------------------
BIN="${BIN:-.venv/bin}"                          # where pvapy-* and peaknet-pva live
PY="$BIN/python"
RUNTIME="${RUNTIME:-60}"                         # seconds the source streams
FPS="${FPS:-10}"                                 # source frame rate (an integer)
NC="${NC:-2}"                                    # consumers per set (-nc), same for both sets
DU="${DU:-4}"                                    # consecutive frames per consumer (-du)
SOURCE="${SOURCE:-adsim}"                        # adsim | replay
DETECTOR="${DETECTOR:-single}"                   # simulated frames: single | epix10k2m | jungfrau4m
N_FRAMES="${N_FRAMES:-100}"                      # distinct simulated frames (the source loops them)
ARGS_FILE="${ARGS_FILE:-examples/args/cpu.json}" # PeakNetImageProcessor --processor-args
WRITER_ARGS_FILE="${WRITER_ARGS_FILE:-examples/args/cxi-writer.json}"
OUT="${OUT:-out/four_terminals}"
PREFIX="${PREFIX:-}"                             # prepended to every channel name (e.g. "me:")
IMAGE="${PREFIX}pvapy:image"; PK="${PREFIX}peaknet"; CX="${PREFIX}cxi"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-300}"        # seconds for model load + warm-up per consumer set
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-300}"            # max seconds to wait for the backlog after the source ends
STOP_TIMEOUT="${STOP_TIMEOUT:-120}"              # seconds a set gets to drain after SIGINT
PEAKNET_CLASS="${PEAKNET_CLASS:-peaknet_pva.PeakNetImageProcessor}"
CXI_CLASS="${CXI_CLASS:-peaknet_pva.CxiFileProcessor}"
VIEW="${VIEW:-auto}"                             # auto: start c2dv if installed and DISPLAY is set
CONSUMER_RT=$(( STARTUP_TIMEOUT + RUNTIME + DRAIN_TIMEOUT + 60 ))  # hard upper bound (-rt) for each set

mkdir -p "$OUT/logs"
PIDS=()

stop_pid() {  # SIGINT one process we started, wait up to STOP_TIMEOUT, then SIGKILL it and its children
    local pid=$1 waited=0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -INT "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$STOP_TIMEOUT" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        echo "pid $pid did not stop in ${STOP_TIMEOUT}s: SIGKILL" >&2
        for child in $(pgrep -P "$pid" 2>/dev/null); do kill -KILL "$child" 2>/dev/null; done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
}
cleanup() {  # source and viewer first, then the PeakNet set (drains, publishes), then the writers
    trap - INT TERM EXIT
    local i
    for (( i=${#PIDS[@]}-1; i>=2; i-- )); do stop_pid "${PIDS[$i]}"; done
    [ "${#PIDS[@]}" -ge 1 ] && stop_pid "${PIDS[0]}"
    [ "${#PIDS[@]}" -ge 2 ] && { sleep 2; stop_pid "${PIDS[1]}"; }
}
trap cleanup EXIT
trap 'echo "interrupted: stopping" >&2; exit 130' INT TERM

wait_status() {  # $1 = pid of the set, then its status channels: wait until all answer (__init__ returned)
    local pid=$1 t0=$SECONDS; shift
    until "$PY" -c "import sys; from peaknet_pva.pva.procs import wait_for_status; \
wait_for_status(sys.argv[1:], timeout_s=2)" "$@" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then echo "consumer set $pid exited:" >&2; return 1; fi
        if [ $(( SECONDS - t0 )) -ge "$STARTUP_TIMEOUT" ]; then echo "timeout waiting for $*" >&2; return 1; fi
        sleep 2
    done
    echo "ready: $*"
}
channels() { local p=$1 k; for (( k=1; k<=NC; k++ )); do printf '%s ' "${p/\*/$k}"; done; }

# --- processor arguments ------------------------------------------------------------------------------
# weights "default" needs peaknet_pva/weights/peaknet-default.pt (shipped by the lead's training run);
# without it this demo uses random weights (the plumbing works, the peaks are meaningless).
PEAKNET_ARGS=$("$PY" - "$ARGS_FILE" <<'EOF'
import json, sys
from peaknet_pva.finder import default_weights_path
args = json.load(open(sys.argv[1]))
if args.get("weights", "default") == "default" and not default_weights_path().exists():
    print(f"note: {default_weights_path()} missing: using weights='random'", file=sys.stderr)
    args["weights"] = "random"
print(json.dumps(args))
EOF
) || exit 1
# The writer writes to OUT/cxi. pvapy-ad-sim-server sends no PhotonEnergy attribute: unless the PeakNet
# arguments set photon_energy_ev, the writer gets a 9500 eV fallback so that its frames are not skipped.
CXI_ARGS=$("$PY" - "$WRITER_ARGS_FILE" "$OUT/cxi" "$SOURCE" "$PEAKNET_ARGS" <<'EOF'
import json, sys
args = json.load(open(sys.argv[1]))
args["output_dir"] = sys.argv[2]
if sys.argv[3] != "replay" and json.loads(sys.argv[4]).get("photon_energy_ev") is None:
    args.setdefault("photon_energy_ev", 9500.0)
print(json.dumps(args))
EOF
) || exit 1

# --- frames for the source ---------------------------------------------------------------------------
if [ ! -f "$OUT/sim/frames.npy" ]; then
    "$BIN/peaknet-pva" simulate --detector "$DETECTOR" --n-frames "$N_FRAMES" --out "$OUT/sim" || exit 1
fi

# --- terminal 1: PeakNet inference consumers -----------------------------------------------------------
# -nc N: N forked consumers, ids 1..N ("*" in channel names). -du K: the server's distributor gives
# each consumer K consecutive frames in turn. -sqs: server-side queue per consumer (the default of 0
# means pvAccess's 2-deep queue: frames are lost at kHz). -rt: hard time bound. -dc: no curses.
"$BIN/pvapy-hpc-consumer" \
    --input-channel "$IMAGE" \
    --output-channel "$PK"':*:output' \
    --control-channel "$PK"':*:control' \
    --status-channel "$PK"':*:status' \
    --processor-class "$PEAKNET_CLASS" \
    --processor-args "$PEAKNET_ARGS" \
    --n-consumers "$NC" --distributor-updates "$DU" \
    --server-queue-size 1000 \
    --report-period 5 --runtime "$CONSUMER_RT" --disable-curses \
    > "$OUT/logs/peaknet.log" 2>&1 &
PIDS+=($!)
wait_status "${PIDS[0]}" $(channels "$PK"':*:status') || { tail -n 30 "$OUT/logs/peaknet.log" >&2; exit 1; }

# --- terminal 2: CXI writer consumers --------------------------------------------------------------------
# Writer k reads peaknet:k:output ("*" is the consumer id, not a wildcard), so -nc matches terminal 1.
# No -du here (one client per channel). -oo tells pvapy's nMissed that each writer sees blocks of DU ids
# every NC*DU; without it processorStats.nMissed counts the other consumers' frames as missed.
"$BIN/pvapy-hpc-consumer" \
    --input-channel "$PK"':*:output' \
    --control-channel "$CX"':*:control' \
    --status-channel "$CX"':*:status' \
    --processor-class "$CXI_CLASS" \
    --processor-args "$CXI_ARGS" \
    --n-consumers "$NC" \
    --oid-offset $(( (NC - 1) * DU + 1 )) \
    --server-queue-size 1000 \
    --report-period 5 --runtime "$CONSUMER_RT" --disable-curses \
    > "$OUT/logs/cxi.log" 2>&1 &
PIDS+=($!)
wait_status "${PIDS[1]}" $(channels "$CX"':*:status') || { tail -n 30 "$OUT/logs/cxi.log" >&2; exit 1; }

# --- terminal 4: viewer (optional; pip install c2dataviewer) ----------------------------------------------
if [ "$VIEW" != "no" ] && command -v c2dv >/dev/null 2>&1 && [ -n "${DISPLAY:-}" ]; then
    c2dv --app image --pv "$PK:1:output" > "$OUT/logs/c2dv.log" 2>&1 &
    PIDS+=($!)
else
    echo "viewer: run 'c2dv --app image --pv $PK:1:output' (and --pv $IMAGE) where c2dv is installed"
fi

# --- terminal 3: the source (runs in the foreground, ends by itself after RUNTIME s) -------------------------
echo "source: $SOURCE, $FPS fps for $RUNTIME s on $IMAGE"
if [ "$SOURCE" = replay ]; then
    # Our replay server: NtNdArray + per-frame PhotonEnergy attribute from the simulator's truth.h5.
    # --wait-connected: stream only once every PeakNet consumer's monitor is connected (its status
    # channel shows receiverStats.nReceived >= 1; refreshed every -rp seconds).
    WAITS=(); for ch in $(channels "$PK"':*:status'); do WAITS+=(--wait-connected "$ch"); done
    "$BIN/peaknet-pva" replay "$OUT/sim" -c "$IMAGE" --fps "$FPS" --loop -rt "$RUNTIME" "${WAITS[@]}" \
        > "$OUT/logs/source.log" 2>&1 &
else
    # pvapy's simulator replaying the .npy (no per-frame attributes: photon_energy_ev in the args is used).
    # -std: seconds between serving the channel and the first frame, for the consumers' monitors to find
    # the new server (they searched before it existed); -shd: seconds it keeps serving after the last frame.
    "$BIN/pvapy-ad-sim-server" -cn "$IMAGE" -if "$OUT/sim/frames.npy" -fps "$FPS" -rt "$RUNTIME" \
        -std 10 -shd 2 -rp "$(( FPS * 10 ))" -dc \
        > "$OUT/logs/source.log" 2>&1 &
fi
SRC=$!
PIDS+=("$SRC")
wait "$SRC"
echo "source done; waiting until every received frame is processed (at most ${DRAIN_TIMEOUT}s)"
# The status channels refresh every report period (-rp 5). Drained: nFramesIn = nProcessed + nDropped
# + nBadFrames and ringFill = 0 on every PeakNet consumer, and nQueued = 0 on every writer.
"$PY" - "$DRAIN_TIMEOUT" "$NC" "$PK" "$CX" <<'EOF'
import sys, time
from peaknet_pva.pva.procs import read_status
timeout, nc, pk, cx = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
keys = {pk: ("nFramesIn", "nProcessed", "nDropped", "nBadFrames", "nMissedIds", "nHits", "framesPerSecond"),
        cx: ("nReceived", "nWritten", "nSkipped", "nBuffered", "nFiles", "nNoImage", "nDropped", "nWriteErrors")}
def snapshot():
    return {(s, k): read_status(f"{s}:{k}:status").get("userStats", {}) for s in keys for k in range(1, nc + 1)}
deadline, last = time.monotonic() + timeout, None
while True:
    time.sleep(5)
    try:
        snap = snapshot()
    except Exception as exc:  # a consumer set is gone (crashed, or its -rt ran out)
        print(f"cannot read a status channel: {exc}")
        sys.exit(0)
    done = all(u.get("ringFill", 1) == 0 and u.get("nFramesIn", -1) ==
               u.get("nProcessed", 0) + u.get("nDropped", 0) + u.get("nBadFrames", 0)
               for (s, _), u in snap.items() if s == pk)
    done = done and all(u.get("nQueued", 1) == 0 for (s, _), u in snap.items() if s == cx)
    if (done and snap == last) or time.monotonic() > deadline:
        break
    last = snap
print("drained" if done else "drain timeout: stopping anyway (stop() still drains)")
for (s, k), u in sorted(snap.items()):
    print(f"  {s}:{k}", {key: u.get(key) for key in keys[s]})
EOF

# --- stop in order: PeakNet set first (publishes what it holds), then the writers (close the last chunk) -----
cleanup

echo "--- CXI files in $OUT/cxi (the writers closed their last chunk on SIGINT):"
"$BIN/peaknet-pva" inspect "$OUT/cxi" --min-peaks 0 --json 2>/dev/null \
    | "$PY" -c "import json, sys; s = json.load(sys.stdin); print('cxi:', {k: s[k] for k in ('n_files', 'n_frames', 'n_peaks_total', 'unique_id_range')})" \
    || echo "no CXI files (see $OUT/logs/cxi.log)"
