#!/usr/bin/env bash
# Stream a simulated dataset (frames.npy + truth.h5, per-frame photon energy) over PVA on loopback.
#
#   sim/replay.sh [DATA_DIR] [CHANNEL] [FPS] [N_FRAMES]
#
# Defaults: sim/data, pvapy:image, 100 fps, one pass over the data. Make the data first with
#   .venv/bin/peaknet-pva simulate --n-frames 200 --detector epix10k2m --out sim/data
# Stop with Ctrl-C (the server stops cleanly). See sim/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
data="${1:-$here/data}"
channel="${2:-pvapy:image}"
fps="${3:-100}"
n_frames="${4:-}"

# EPICS on loopback only (a value you already exported wins).
: "${EPICS_PVA_AUTO_ADDR_LIST:=NO}" "${EPICS_PVA_ADDR_LIST:=127.0.0.1}"
: "${EPICS_PVAS_INTF_ADDR_LIST:=127.0.0.1}" "${EPICS_PVAS_AUTO_BEACON_ADDR_LIST:=NO}"
: "${EPICS_PVAS_BEACON_ADDR_LIST:=127.0.0.1}" "${EPICS_CA_AUTO_ADDR_LIST:=NO}" "${EPICS_CA_ADDR_LIST:=127.0.0.1}"
export EPICS_PVA_AUTO_ADDR_LIST EPICS_PVA_ADDR_LIST EPICS_PVAS_INTF_ADDR_LIST EPICS_PVAS_AUTO_BEACON_ADDR_LIST \
       EPICS_PVAS_BEACON_ADDR_LIST EPICS_CA_AUTO_ADDR_LIST EPICS_CA_ADDR_LIST

python="${PYTHON:-$repo/.venv/bin/python}"
args=("$data" -c "$channel" --fps "$fps")
if [[ -n "$n_frames" ]]; then args+=(-n "$n_frames"); fi
exec "$python" -m peaknet_pva.pva.replay "${args[@]}"
