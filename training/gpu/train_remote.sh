#!/usr/bin/env bash
# Train a run on a GPU host from a carried cache, then pack it for the trip home.
#
#   training/gpu/train_remote.sh CACHE OUT [cxr-train all options: --set key=value ...]
#
# Writes OUT/run.tar.part00, part01, ... (training/gpu/pack.py) and OUT/train.log (bounded).
# Training runs under `timeout`: when it is cut short or fails, what exists is packed anyway
# and the pack manifest says what is missing. The exit status is pack.py's (0: packed within
# the size budget), not training's.
#
# Environment (defaults):
#   PYTHON=python3            interpreter with torch
#   CONFIG=training/configs/default.toml
#   WORKDIR=/tmp/cxr-run      run folder on the GPU host
#   TRAIN_TIMEOUT=450         seconds for `cxr-train all`
#   EVAL_TIMEOUT=60           seconds for a fallback `cxr-train evaluate` when `all` was cut
#                             short after split 0 was trained (0: never)
#   PACK_ARGS=                extra options for pack.py (e.g. "--max-total-mb 62")
#   LOG_MAX_BYTES=1500000     OUT/train.log keeps the head and the tail of the full log
#   FORCE_WHEELS=0            1: install the carried wheels even when the imports work
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CACHE OUT [--set key=value ...]" >&2
    exit 2
fi
mkdir -p "$2"
CACHE=$(realpath "$1")
OUT=$(realpath "$2")
shift 2
cd "$(dirname "$0")/../.." || exit 2 # the repository root

PY=${PYTHON:-python3}
CONFIG=${CONFIG:-training/configs/default.toml}
WORKDIR=${WORKDIR:-/tmp/cxr-run}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-450}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-60}
LOG_MAX_BYTES=${LOG_MAX_BYTES:-1500000}
FULL_LOG=${FULL_LOG:-/tmp/cxr-train-full.log}

: >"$FULL_LOG"
START=$SECONDS

say() { # to stdout and to the log
    echo "[train_remote +$((SECONDS - START))s] $*" | tee -a "$FULL_LOG"
}

# Quiet, unbuffered, wide logs: progress bars are off (they turn themselves off when stderr is
# not a terminal) and rich does not wrap at 80 columns.
export PYTHONUNBUFFERED=1 COLUMNS=160 PYTHONDONTWRITEBYTECODE=1

# ---------------------------------------------------------------- dependencies
SITE=
if [ -d .whl ] && { [ "${FORCE_WHEELS:-0}" = 1 ] || ! "$PY" -c "import pydantic, albumentations" 2>/dev/null; }; then
    SITE=/tmp/site
    say "installing the carried wheels into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        .whl/*.whl >>"$FULL_LOG" 2>&1; then
        say "pip failed (see the log): unzipping the wheels into $SITE instead"
        "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$SITE" .whl/*.whl >>"$FULL_LOG" 2>&1 || say "WARNING: the wheels could not be installed"
    fi
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - 2>&1 <<'EOF' | tee -a "$FULL_LOG"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "numpy", "cv2", "pydantic", "albumentations", "sklearn",
             "matplotlib", "onnx", "onnxruntime", "hnswlib"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name} MISSING ({type(exc).__name__})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | tee -a "$FULL_LOG"; else say "no nvidia-smi"; fi
say "nproc $(nproc); cache $CACHE ($(du -h "$CACHE" 2>/dev/null | cut -f1)); config $CONFIG; args: $*"

# ---------------------------------------------------------------- training
say "cxr-train all (timeout ${TRAIN_TIMEOUT}s)"
timeout -k 30 "$TRAIN_TIMEOUT" "$PY" -m training.cli all -c "$CONFIG" --cache "$CACHE" \
    --workdir "$WORKDIR" "$@" >>"$FULL_LOG" 2>&1
TRAIN_RC=$?
case $TRAIN_RC in
    0) say "training finished" ;;
    124 | 137) say "training CUT SHORT by the ${TRAIN_TIMEOUT}s timeout (rc $TRAIN_RC)" ;;
    *) say "training FAILED (rc $TRAIN_RC)" ;;
esac

# Cut short after split 0's members were trained: the report (which the export needs) can
# still be written from what exists; missing splits and ablations are reported as such.
if [ $TRAIN_RC -ne 0 ] && [ ! -f "$WORKDIR/report/report.json" ] && [ "$EVAL_TIMEOUT" -gt 0 ] &&
    "$PY" - "$WORKDIR" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
try:
    members = json.loads((run / "config.json").read_text())["members"]
except (OSError, KeyError, ValueError):
    sys.exit(1)
done = all((run / "split-0" / m["name"] / "result.json").is_file() for m in members)
sys.exit(0 if done and (run / "lungmaps.npz").is_file() else 1)
EOF
then
    SETS=()
    while [ $# -gt 0 ]; do
        case $1 in
            --set) [ $# -gt 1 ] && SETS+=(--set "$2") && shift ;;
            --set=*) SETS+=("$1") ;;
        esac
        shift
    done
    say "split 0 is complete: cxr-train evaluate on what exists (timeout ${EVAL_TIMEOUT}s)"
    timeout -k 15 "$EVAL_TIMEOUT" "$PY" -m training.cli evaluate -c "$CONFIG" --cache "$CACHE" \
        --workdir "$WORKDIR" ${SETS[@]+"${SETS[@]}"} >>"$FULL_LOG" 2>&1
    say "fallback evaluate rc $?"
fi

# ---------------------------------------------------------------- packing
say "packing $WORKDIR -> $OUT"
# shellcheck disable=SC2086
"$PY" training/gpu/pack.py "$WORKDIR" "$OUT" --training-rc "$TRAIN_RC" ${PACK_ARGS:-} >>"$FULL_LOG" 2>&1
PACK_RC=$?
say "pack rc $PACK_RC; total $((SECONDS - START))s"

# The log that comes home (rich pads its lines: trailing blanks go): all of it when small,
# else its head and its tail.
sed 's/[[:space:]]*$//' "$FULL_LOG" >"$FULL_LOG.trimmed"
SIZE=$(stat -c %s "$FULL_LOG.trimmed")
if [ "$SIZE" -le "$LOG_MAX_BYTES" ]; then
    cp "$FULL_LOG.trimmed" "$OUT/train.log"
else
    HEAD=$((LOG_MAX_BYTES / 5))
    {
        head -c "$HEAD" "$FULL_LOG.trimmed"
        printf '\n\n[... %d bytes of the log left out ...]\n\n' "$((SIZE - LOG_MAX_BYTES))"
        tail -c "$((LOG_MAX_BYTES - HEAD - 100))" "$FULL_LOG.trimmed"
    } >"$OUT/train.log"
fi

echo "----- last lines of the log -----"
grep -v '^$' "$FULL_LOG.trimmed" | grep -v 'left out: .*\(resume checkpoint\|predictions travel\)' | tail -n 70
echo "----- $OUT -----"
ls -l "$OUT"
exit $PACK_RC
