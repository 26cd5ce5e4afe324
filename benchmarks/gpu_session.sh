#!/usr/bin/env bash
# One GPU session, end to end, from a clone of this repository plus an offline bundle (`bts bundle`, docs/offline.md):
#   1. installs the bundle's wheels (the project's and the dependencies the node lacks) into a private folder;
#   2. bench:     benchmarks/gpu_check.py --sizes smol  -> OUT/gpu_check_smol.json (the training-loop levers as MFU);
#   3. reproduce: bts reproduce --profile smol          -> results/smol/, copied to OUT/results_smol.tar.gz with
#                 the stage logs (OUT/logs_smol.tar.gz; written also when a stage fails).
# Each step is skipped when its output exists, and the reproduction resumes stage by stage, so running the script
# again after an interruption continues where it stopped.
#
# Usage: benchmarks/gpu_session.sh --bundle DIR [--out DIR] [--steps bench,reproduce] [--site DIR] [--profile NAME]
#   --bundle  the folder made by `bts bundle DIR --deps --with-corpus [--without-data-wheels]` (docs/offline.md)
#   --out     where the JSON and archives go (default: gpu_session_out)
#   --steps   which steps to run (default: bench,reproduce)
#   --site    where packages are installed (default: /tmp/bts_site)
#   --profile the reproduction profile (default: smol; smol_smoke rehearses the session on a CPU, where the bench
#             step is gpu_check's dry run)
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE="" OUT="gpu_session_out" STEPS="bench,reproduce" SITE="/tmp/bts_site" PROFILE="smol"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) BUNDLE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --site) SITE="$2"; shift 2 ;;
    --profile) PROFILE="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$BUNDLE" && -d "$BUNDLE" ]] || { echo "error: --bundle DIR is required and must be a folder" >&2; exit 2; }
BUNDLE="$(cd "$BUNDLE" && pwd)"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
log() { echo "[gpu_session $(date +%H:%M:%S)] $*"; }
T0=$(date +%s)

# 1. packages: the node's own stack, plus what the bundle carries, in a private folder
if [[ ! -f "$SITE/.bts-installed" ]]; then
  log "installing the project and the bundle's dependency wheels into $SITE"
  mkdir -p "$SITE"
  # the bundle's wheels: the dependencies the node lacks and the project's own wheel, built by `bts bundle` from
  # this clone's commit (bundle.json records it), so no build tool runs on the node
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/python-wheels/*.whl
  touch "$SITE/.bts-installed"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" BTS_BUNDLE="$BUNDLE"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import bts, torch; print('bts from', bts.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"

if [[ ",$STEPS," == *",bench,"* ]]; then
  if [[ -s "$OUT/gpu_check_smol.json" ]]; then
    log "bench: $OUT/gpu_check_smol.json exists, skipped"
  else
    dry=()
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || dry=(--allow-cpu)
    log "bench: benchmarks/gpu_check.py --sizes smol --only-sizes ${dry[*]}"
    "$PY" benchmarks/gpu_check.py --sizes smol --only-sizes "${dry[@]}" > "$OUT/gpu_check_smol.json.tmp"
    mv "$OUT/gpu_check_smol.json.tmp" "$OUT/gpu_check_smol.json"
  fi
fi

if [[ ",$STEPS," == *",reproduce,"* ]]; then
  log "reproduce: bts reproduce --profile $PROFILE"
  status=0
  bts reproduce --profile "$PROFILE" --no-progress || status=$?
  tar czf "$OUT/logs_$PROFILE.tar.gz" "runs/$PROFILE/logs" "runs/$PROFILE/.stages" 2>/dev/null || true
  if [[ $status -ne 0 ]]; then
    log "reproduce failed (exit $status); stage logs in $OUT/logs_$PROFILE.tar.gz"
    exit "$status"
  fi
  tar czf "$OUT/results_$PROFILE.tar.gz" "results/$PROFILE"
  log "reproduce: results/$PROFILE -> $OUT/results_$PROFILE.tar.gz"
fi
log "done in $(( $(date +%s) - T0 )) s"
