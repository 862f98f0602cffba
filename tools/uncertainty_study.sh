#!/usr/bin/env bash
# The uncertainty study of docs/uncertainty-study.md: for every (task, KL weight, seed) train a
# PVeRA adapter, fit calibration.json on rows the run left unused (pvera calibrate --held-out-of),
# and evaluate on the test rows it set aside (pvera eval --held-out-of), mean mode and MC-16, before
# and after temperature scaling. Then `python3 tools/uncertainty_study_report.py` aggregates.
#
#   bash tools/uncertainty_study.sh                 # every run below, skipping steps already done
#   RUNS="spam:0:0 fmnist:1:2" bash tools/uncertainty_study.sh
#
# Needs `python3 tools/fetch_assets.py --only minilm,spamassassin,dinov2s,fashion-mnist,digits` and
# `cargo build --release -p pvera-cli`. Each step is skipped when its output exists, so an
# interrupted study resumes; delete a run folder to redo it. Runs one process at a time, niced.
#
# Tasks (the settings the study reports):
#   spam    all-MiniLM-L6-v2 on SpamAssassin: r 256 on query,value, mean pooling, max length 64,
#           1,000-mail subset (800 train / 200 validation), 3 epochs, batch 16, AdamW lr 2e-2, wd 0.01;
#           calibration 300 unused mails, test 500 others.
#   fmnist  DINOv2-S on Fashion-MNIST: r 256 on query,value, cls-mean-patch pooling, 500-image subset
#           (400 / 100), 2 epochs, batch 16, lr 1e-2 with 10 % warm-up, wd 0.01; calibration 150
#           unused images, test 200 others; OOD: 100 UCI digits, 50 uniform-noise images.
# KL weight w is pvera train --kl-weight (loss = task loss + w * mean KL over adapted layers); the
# paper's beta maps to w = (number of blocks) / beta (docs/uncertainty-study.md).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/pvera}"
ASSETS="${PVERA_ASSETS:-$PWD/.cache/assets}"
OUT="${OUT:-.cache/study}"
THREADS="${THREADS:-2}"
SAMPLES="${SAMPLES:-16}"
RUNS="${RUNS:-spam:0:0 spam:0:1 spam:0:2 fmnist:0:0 fmnist:0:1 fmnist:0:2 spam:1:0 spam:1:1 spam:1:2 spam:10:0 spam:10:1 spam:10:2 fmnist:10:0 fmnist:10:1 fmnist:10:2 spam:6e-6:0 spam:6e-6:1 spam:6e-6:2}"
NICE="nice -n 10"
mkdir -p "$OUT"

step() { # name, done-file, command...
  local name=$1 done=$2
  shift 2
  if [[ -e $done ]]; then
    echo "[$(date +%T)] $name: done already"
    return
  fi
  echo "[$(date +%T)] $name: $*"
  local t0=$SECONDS
  "$@"
  echo "[$(date +%T)] $name: $((SECONDS - t0))s"
}

for run in $RUNS; do
  IFS=: read -r task kl seed <<<"$run"
  dir="$OUT/$task-kl$kl-s$seed"
  case $task in
    spam)
      model="$ASSETS/minilm"
      data="$ASSETS/spamassassin/mails.jsonl"
      train=(--task text-classification --pooling mean --train-size 1000 --max-length 64 --epochs 3 --lr 2e-2)
      cal=(--calibration-size 300 --test-size 500 --batch-size 16)
      ev=(--batch-size 16)
      ;;
    fmnist)
      model="$ASSETS/dinov2s"
      data="$ASSETS/fashion-mnist"
      train=(--task image-classification --pooling cls-mean-patch --train-size 500 --epochs 2 --lr 1e-2 --warmup-ratio 0.1)
      cal=(--calibration-size 150 --test-size 200)
      ev=(--ood-limit 100 --ood "$ASSETS/digits/digits-images-idx3-ubyte" --ood noise:50)
      ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
  esac
  step "$task kl $kl seed $seed: train" "$dir/metrics.json" \
    $NICE "$BIN" train --model "$model" --data "$data" --output "$dir" --r 256 --target-modules query,value \
      --batch-size 16 --weight-decay 0.01 --seed "$seed" --kl-weight "$kl" --threads "$THREADS" "${train[@]}"
  step "$task kl $kl seed $seed: calibrate" "$dir/best/calibration.json" \
    $NICE "$BIN" calibrate --model "$model" --adapter "$dir/best" --data "$data" --held-out-of "$dir" \
      --samples "$SAMPLES" --seed "$seed" --threads "$THREADS" "${cal[@]}"
  step "$task kl $kl seed $seed: eval" "$dir/eval/eval.json" \
    $NICE "$BIN" eval --model "$model" --adapter "$dir/best" --data "$data" --held-out-of "$dir" \
      --samples "$SAMPLES" --seed "$seed" --threads "$THREADS" --output "$dir/eval" "${ev[@]}"
done
echo "[$(date +%T)] study runs done; aggregate with: python3 tools/uncertainty_study_report.py --study $OUT"
