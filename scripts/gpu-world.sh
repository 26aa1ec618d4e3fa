#!/usr/bin/env bash
# The whole world (vae -> sd -> blip -> judge) trained on a GPU in one unattended call, then packed into
# one file so the weights come back; `world check` then runs on the CPU, before anything is installed.
#
#   scripts/gpu-world.sh OUT_DIR                   a GPU machine with this checkout installed
#   scripts/gpu-world.sh --wheels DIR OUT_DIR      a GPU machine with torch+CUDA but no package index: the
#                                                  wheels of `scripts/gpu-check.sh --download-wheels DIR`
#   scripts/gpu-world.sh --dry-run OUT_DIR         the same steps on the CPU with tiny step counts (CI)
#   scripts/gpu-world.sh --budget 480 OUT_DIR      seconds the training may take in all [480]
#
# OUT_DIR receives world-models.tar (each model's final folder), world.json (minutes per model, the
# device), train.log, and check.sh: the `world check` command to run where the tar lands. A killed or
# timed-out run leaves its checkpoints under OUT_DIR/runs: the same command resumes it.
# Not yet run on a GPU: whether the default step counts fit the budget there is unmeasured.
#
# Then, on the CPU:
#   tar xf OUT_DIR/world-models.tar -C RUNS && bash OUT_DIR/check.sh RUNS
#   finestyle world install RUNS/sd RUNS/vae --model sd --gates RUNS/check.json   (and blip, judge)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY=0 WHEELS="" OUT="" BUDGET=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || { echo "usage: scripts/gpu-world.sh [--dry-run] [--wheels DIR] OUT_DIR (see --help)" >&2; exit 2; }
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
  echo "error: --wheels $WHEELS is not a folder; make it with scripts/gpu-check.sh --download-wheels DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="python3"
[[ -x .venv/bin/python ]] && PY="$REPO/.venv/bin/python"
if [[ -n "$WHEELS" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$OUT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DRY == 1 ]]; then
  ARGS=(--device cpu --threads 1 --steps 4 --batch-size 4 --n-train 64 --checkpoint-every 2)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: torch sees no CUDA device here; run with --dry-run on a CPU" >&2; exit 2; }
  ARGS=(--device cuda --threads "$(nproc)" --checkpoint-every 500)
fi

# 1. train every model (no checks here: they run on the CPU, where the weights will be installed)
echo "== world train --all (at most ${BUDGET} s)"
timeout --kill-after=10 "$BUDGET" "$PY" -m finestyle.cli world train --all --out "$OUT/runs" \
  --check-scale 0 "${ARGS[@]}" 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
[[ $rc == 124 || $rc == 137 ]] && echo "training stopped at the ${BUDGET} s budget; run again to resume"

# 2. the weights back in one file, with the summary and the CPU's check command
models=()
for m in vae sd blip judge; do
  [[ -d "$OUT/runs/$m/model" ]] && models+=("$m/model" "$m/report.json")
done
if [[ ${#models[@]} -gt 0 ]]; then
  tar -cf "$OUT/world-models.tar" -C "$OUT/runs" "${models[@]}"
  echo "packed ${#models[@]} files of $(( ${#models[@]} / 2 )) model(s) into $OUT/world-models.tar"
fi
[[ -f "$OUT/runs/world.json" ]] && cp "$OUT/runs/world.json" "$OUT/world.json"
cat >"$OUT/check.sh" <<'EOF'
# bash check.sh RUNS [world check options]: the gates of the models unpacked under RUNS, on the CPU
set -u
R="${1:?usage: bash check.sh RUNS [world check options]}"
shift
finestyle world check --sd "$R/sd/model" --blip "$R/blip/model" --judge "$R/judge/model" --vae "$R/vae/model" \
  --only judge --only sd --only blip --only vae --json "$R/check.json" "$@"
EOF
exit "$rc"
