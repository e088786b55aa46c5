#!/usr/bin/env bash
# Runs the BK, Hugging Face, LazyDP and matrix-mechanism benchmarks on one GPU and writes ONE JSON.
#
#   bash benchmarks/gpu.sh [--quick] [--out FILE] [--device cuda|cpu]
#
# Each benchmark runs in its own process under a time budget (the total stays under 8 minutes:
# 110 + 130 + 90 + 100 s plus start-up); a benchmark that fails or runs out of time is recorded
# with its exit status and the tail of its log, and the others still run. Benchmarks whose script
# has no --device option (bk.py, hf.py at the time of writing) run where that script puts them;
# the JSON records which ones received the device. --quick: small sizes, so the script can be
# checked on a CPU-only machine. Run from the repository root with dpkit's environment active.
set -uo pipefail

QUICK=0
OUT=benchmarks/gpu_results.json
DEVICE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
if [ -z "$DEVICE" ]; then
  DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

has_device_flag() { $PY "$1" --help 2>/dev/null | grep -q -- "--device"; }

# run NAME BUDGET_S JSON_FILE_OR_- SCRIPT ARGS...: the JSON comes from JSON_FILE, or (JSON_FILE "-")
# is the list of stdout lines that are JSON objects (bk.py prints one per model)
run() {
  local name=$1 budget=$2 json=$3 script=$4; shift 4
  local args=("$@") dev="no"
  if has_device_flag "$script"; then args+=(--device "$DEVICE"); dev="yes"; fi
  local start=$(date +%s%N)
  timeout --signal=TERM --kill-after=10 "$budget" $PY "$script" "${args[@]}" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc" >"$WORK/$name.rc"
  echo "$dev" >"$WORK/$name.dev"
  echo "$(( ($(date +%s%N) - start) / 1000000 ))" >"$WORK/$name.ms"
  echo "$json" >"$WORK/$name.jsonsrc"
  echo "== $name: exit $rc in $(cat "$WORK/$name.ms") ms (device flag: $dev)"
  tail -n 25 "$WORK/$name.log" | grep -v '^{' || true
}

if [ "$QUICK" = 1 ]; then
  run bk 110 - benchmarks/bk.py --models cnn --rounds 2 --no-memory --json
  run hf 130 "$WORK/hf.json" benchmarks/hf.py --models bert --configs non-private,dpkit-bk --rounds 2 \
    --no-memory --json-out "$WORK/hf.json"
  run lazydp 90 "$WORK/lazydp.json" benchmarks/lazydp.py --quick --json "$WORK/lazydp.json"
  run matrix 100 "$WORK/matrix.json" benchmarks/matrix.py --quick --sections optimisation overhead \
    --json "$WORK/matrix.json"
else
  run bk 110 - benchmarks/bk.py --rounds 5 --no-memory --json
  run hf 130 "$WORK/hf.json" benchmarks/hf.py --models gpt2,bert,vit --rounds 3 --no-memory \
    --json-out "$WORK/hf.json"
  run lazydp 90 "$WORK/lazydp.json" benchmarks/lazydp.py --rows 1000000 --rounds 7 --json "$WORK/lazydp.json"
  run matrix 100 "$WORK/matrix.json" benchmarks/matrix.py --sections optimisation overhead \
    --json "$WORK/matrix.json"
fi

$PY - "$WORK" "$OUT" "$DEVICE" "$QUICK" <<'EOF'
import json, os, platform, sys
work, out, device, quick = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    torch_version = torch.__version__
except Exception as exc:  # the JSON is still written
    gpu, torch_version = f"torch unavailable: {exc}", None
result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu,
                      "torch": torch_version, "device": device}, "quick": quick, "benchmarks": {}}
for name in ("bk", "hf", "lazydp", "matrix"):
    read = lambda suffix: open(os.path.join(work, f"{name}.{suffix}")).read().strip()
    log = read("log")
    entry = {"exit_code": int(read("rc")), "seconds": int(read("ms")) / 1000,
             "device_flag": read("dev") == "yes", "result": None}
    src = read("jsonsrc")
    try:
        if src == "-":
            entry["result"] = [json.loads(line) for line in log.splitlines() if line.startswith("{")] or None
        elif os.path.exists(src):
            entry["result"] = json.load(open(src))
    except (json.JSONDecodeError, OSError) as exc:
        entry["parse_error"] = str(exc)
    if entry["exit_code"] != 0 or entry["result"] is None:
        entry["log_tail"] = log[-3000:]
    result["benchmarks"][name] = entry
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
print(f"wrote {out}: " + ", ".join(f"{k} exit {v['exit_code']}" for k, v in result["benchmarks"].items()))
EOF
