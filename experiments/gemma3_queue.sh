#!/bin/bash
# The Gemma 3 270M method table (issue 34): one setting per process, in the run order W4 per-channel, W3 g128,
# W4 g128, each with rtn, gptq, flexround, adaround, lrq. Each process takes the shared CPU lock for itself only (so
# other heavy jobs get turns between settings), skips settings whose JSON exists and resumes an interrupted one from
# its per-layer checkpoints (work/gemma3_ptq/<name>/). Logs: work/gemma3_ptq/<name>.log.
#
#   nohup experiments/gemma3_queue.sh > work/gemma3_queue.log 2>&1 &
#
# PYTHON (default /work/main/.venv/bin/python) and CPU_LOCK (default /work/notes/cpu.lock) override the host's paths.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
CPU_LOCK=${CPU_LOCK:-/work/notes/cpu.lock}
mkdir -p work/gemma3_ptq
for setting in per_channel_w4 per_group128_w3 per_group128_w4; do
  for method in rtn gptq flexround adaround lrq; do
    name=gemma3_${setting}_${method}
    for attempt in 1 2; do   # a second try resumes from the checkpoints of the first
      [ -f "experiments/results/${name}.json" ] && break
      echo "$(date -u +%FT%TZ) start ${name} (attempt ${attempt})"
      flock "$CPU_LOCK" nice -n 5 env PYTHONPATH="$PWD" "$PYTHON" experiments/llm_ptq.py --model gemma3 \
          --only "$setting" --methods "$method" --num-devices 1 >> "work/gemma3_ptq/${name}.log" 2>&1
      echo "$(date -u +%FT%TZ) end ${name}: rc $?"
    done
  done
done
