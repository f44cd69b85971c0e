#!/usr/bin/env bash
# The whole job on the built-in synthetic LUNA16-format data set, from nothing:
# set up .venv, make the data set (if absent), explore it, prefill the caches, train the nodule
# classifier briefly, evaluate it (CPM, FROC plot, pictures), train the segmentation model and the
# malignancy classifier (fine-tuned from the nodule classifier) briefly, run the end-to-end analysis
# on the validation CTs (nodules with probabilities and pictures, the detector's CPM) and say how to
# open TensorBoard.
#
# Everything lands under data-unversioned/synthetic/ (data, cache, checkpoints, evaluation)
# and runs/quickstart/ (TensorBoard); a second run reuses the data and the cache.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/quickstart.sh [--epochs N] [--epoch-size N] [--batch-size N] [--num-workers N]
                                  [--device auto|cpu|cuda] [--work DIR] [--tiny] [--no-setup]
  --epochs N       training epochs (default 10)
  --epoch-size N   balanced training samples per epoch (default 1024: minutes on a CPU)
  --batch-size N   (default 32)     --num-workers N  DataLoader workers (default 2)
  --device D       training/evaluation device (default auto: CUDA when present)
  --work DIR       where data, cache, checkpoints and evaluation go (default data-unversioned/synthetic)
  --tiny           a 4-CT set and a few batches: a smoke test of the pipeline in about a minute
  --no-setup       skip scripts/setup.sh (the environment is already set up)
EOF
}

epochs=10 epoch_size=1024 batch_size=32 num_workers=2 device=auto tiny=0 setup=1
work=data-unversioned/synthetic
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --epochs) epochs=${2:?--epochs needs a value}; shift 2 ;;
    --epoch-size) epoch_size=${2:?--epoch-size needs a value}; shift 2 ;;
    --batch-size) batch_size=${2:?--batch-size needs a value}; shift 2 ;;
    --num-workers) num_workers=${2:?--num-workers needs a value}; shift 2 ;;
    --device) device=${2:?--device needs a value}; shift 2 ;;
    --work) work=${2:?--work needs a value}; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --no-setup) setup=0; shift ;;
    *) echo "quickstart: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n=== %s\n' "$*"; }

if [ "$setup" = 1 ]; then
  step "set-up (scripts/setup.sh)"
  bash scripts/setup.sh
fi
py=${P2CH_VENV:-.venv}/bin/python
[ -x "$py" ] || { echo "quickstart: $py not found; run without --no-setup" >&2; exit 1; }

data=$work/luna cache=$work/cache models=$work/models eval_out=$work/eval
# A nodule-dense set (8 nodules per CT with nodules, LUNA16 has 1.3): enough positives to learn from
# in minutes and enough validation nodules (about 40) that the CPM's CI is narrow.
synth_args=(--num-cts 24 --nodules-per-ct 8 --candidates-per-ct 300)
# The default recipe (Adam, a one-cycle lr peaking at 3e-3 over the whole run), validated after epochs 5
# and 10, with the book's model width 8: the default 16 takes 2.1x the CPU time per sample (BENCHMARKS.md),
# past this script's 10 minutes on 2 CPU cores. The malignancy step fine-tunes the same width.
train_args=(--epochs "$epochs" --epoch-size "$epoch_size" --val-fraction 0.25 --val-every 5 --model-width 8)
seg_args=(--epochs 2 --epoch-size 1024) mal_args=(--epochs 2 --epoch-size 256)
if [ "$tiny" = 1 ]; then
  synth_args=(--num-cts 4 --size 128 --slices 64 --candidates-per-ct 60 --nodules-per-ct 3)
  train_args=(--epochs 1 --epoch-size 64 --max-val-batches 4)
  seg_args=(--epochs 1 --epoch-size 32 --val-slices nodules) mal_args=(--epochs 1 --epoch-size 32)
  batch_size=16
fi

if compgen -G "$data/subset*/*.mhd" >/dev/null; then
  step "synthetic data: reusing $data (delete it to make a new one)"
else
  step "synthetic data: making a LUNA16-format set in $data"
  "$py" -m p2ch.synth --out "$data" "${synth_args[@]}"
fi

step "explore (scripts/explore_data.sh)"
bash scripts/explore_data.sh "$data"

step "prefill the chunk cache, malignancy chunks included (python -m p2ch.prepcache --malignant)"
"$py" -m p2ch.prepcache --data-root "$data" --cache-dir "$cache" --num-workers "$num_workers" --malignant

step "train (python -m p2ch.training)"
"$py" -m p2ch.training --data-root "$data" --cache-dir "$cache" --checkpoint-dir "$models" \
  --tb-prefix quickstart --balanced --augmented --batch-size "$batch_size" --num-workers "$num_workers" \
  --device "$device" "${train_args[@]}" quickstart

step "evaluate the best checkpoint on the validation series (python -m p2ch.evaluate)"
"$py" -m p2ch.evaluate --models-dir "$models" --data-root "$data" --cache-dir "$cache" --split val \
  --device "$device" --num-workers "$num_workers" --pictures 4 --out "$eval_out"

step "segmentation model (python -m p2ch.prepcache --segmentation, python -m p2ch.seg_training)"
"$py" -m p2ch.prepcache --segmentation --data-root "$data" --cache-dir "$cache" --num-workers "$num_workers"
"$py" -m p2ch.seg_training --data-root "$data" --cache-dir "$cache" --checkpoint-dir "$models" \
  --tb-prefix quickstart --augmented --num-workers "$num_workers" --device "$device" "${seg_args[@]}" quickstart-seg

step "malignancy classifier, fine-tuned from the nodule classifier (python -m p2ch.training --malignant)"
nodule_model=$(ls -t "$models"/quickstart/*-quickstart/best.pt | head -n 1)
"$py" -m p2ch.training --malignant --finetune "$nodule_model" --finetune-depth 2 --data-root "$data" \
  --cache-dir "$cache" --checkpoint-dir "$models" --tb-prefix quickstart --augmented --batch-size "$batch_size" \
  --num-workers "$num_workers" --device "$device" "${mal_args[@]}" quickstart-mal

step "end to end on the validation CTs (python -m p2ch.nodule_analysis --run-validation)"
"$py" -m p2ch.nodule_analysis --run-validation --models-dir "$models" --data-root "$data" \
  --out "$work/analysis" --tb-prefix quickstart --device "$device" --num-workers "$num_workers"

runs=${P2CH_RUNS_DIR:-runs}/quickstart
step "done"
echo "evaluation:  $eval_out (metrics.json, froc.png, submission.csv, pictures/)"
echo "analysis:    $work/analysis/validation/<series uid>/ (nodules.csv, nodules_01.png, analysis.json),"
echo "             $work/analysis/validation/ (the detector's metrics.json, froc.png, confusion.csv)"
echo "checkpoints: $models/quickstart/"
echo "TensorBoard: ${P2CH_VENV:-.venv}/bin/tensorboard --logdir $runs   (then open http://localhost:6006)"
