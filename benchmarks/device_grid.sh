#!/usr/bin/env bash
# The benchmark's reduced grid on one GPU, with nnU-Net's default 2D plan (--plan default): what a
# GPU user trains. One target (MSD hippocampus, the only MRI target and the cheapest to plan),
# a third of the zoo, one seed, risk weighting against its uniform control. Sized to finish
# within 8 minutes on one large GPU (docs/benchmark.md, "GPU path"); every piece is resumable,
# so a second call after a cut-off continues.
#
#   benchmarks/device_grid.sh OUT            # from the repository root, the package installed
#
# OUT receives the nnU-Net folders, the work folder, the records (results.csv, schedules,
# zoo records: copy them to docs/benchmark_records/default/) and benchmark.md. Then, here:
#   python -m benchmarks.finetune_grid --report-only --work device_work --dataset-schedule 508 50 50 \
#       --records docs/benchmark_records/default --docs docs/benchmark.md
# (the schedule the grid was given: the report shows only the fine-tunes of each target's schedule)
#
# Settings (environment): DEVICE (cuda), EPOCHS x ITERATIONS (50 x 50, nnU-Net's own 250
# iterations per epoch over 1000 epochs are days, not minutes), JOBS (4 fine-tunes side by side),
# CASES (60 hippocampus cases, as the CPU grid's target), MEMBERS, RISK_TRAINERS (risk and its
# uniform control), ZOO_ITERATIONS (empty: each member's own), SHARED (the folder holding data/; default
# $NNUNET_TE_SHARED, else shared/ beside the checkout). The CPU test runs it with EPOCHS=1
# ITERATIONS=2 and two members (tests/test_device_grid.py).
set -euo pipefail

OUT=$(realpath -m "${1:?usage: benchmarks/device_grid.sh OUT}")
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-50}
ITERATIONS=${ITERATIONS:-50}
JOBS=${JOBS:-4}
CASES=${CASES:-60}
MEMBERS=${MEMBERS:-random_s0 random_s1 ssl_masked_long ssl_mri sup_nuclei sup_isbi_random_labels}
RISK_TRAINERS=${RISK_TRAINERS:-risk risk_uniform}
SHARED=${SHARED:-${NNUNET_TE_SHARED:-$(dirname "$(pwd)")/shared}}
DATASET=${DATASET:-508}

if [ ! -d "$SHARED/data/msd_hippocampus/imagesTr" ]; then
  echo "device_grid.sh: $SHARED/data/msd_hippocampus/imagesTr not found: set SHARED to the folder holding data/" >&2
  exit 1
fi
export nnUNet_raw="$OUT/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet_preprocessed" nnUNet_results="$OUT/nnUNet_results"
# nnU-Net compiles the network on CUDA by default: minutes of compilation per fine-tune, more than
# a short schedule trains. Augmentation workers: one per core share, as nnU-Net sizes them.
export nnUNet_compile=${nnUNet_compile:-f}
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))}
mkdir -p "$OUT"
started=$(date +%s)
stamp() { echo "device_grid.sh: $1 after $(( $(date +%s) - started )) s"; }

if ! ls "$nnUNet_preprocessed"/Dataset"$DATASET"_*/nnUNetPlans_2d >/dev/null 2>&1; then
  nnunet-te data msd_hippocampus -d "$DATASET" --source-dir "$SHARED/data/msd_hippocampus" --cases "$CASES" --seed 0
  nnUNetv2_plan_and_preprocess -d "$DATASET" -c 2d -np "$(nproc)"
fi
stamp "data planned and preprocessed"

# shellcheck disable=SC2086  # MEMBERS and RISK_TRAINERS are lists
python -m benchmarks.finetune_grid -d "$DATASET" --plan default -device "$DEVICE" --work "$OUT/work" \
  --shared "$SHARED" --members $MEMBERS ${ZOO_ITERATIONS:+--zoo-iterations "$ZOO_ITERATIONS"} \
  --shots 5 --seeds 0 --risk-trainers $RISK_TRAINERS --dataset-schedule "$DATASET" "$EPOCHS" "$ITERATIONS" \
  --jobs "$JOBS" --records "$OUT/records" --docs "$OUT/benchmark.md"
stamp "grid done"
