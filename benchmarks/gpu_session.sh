#!/usr/bin/env bash
# What ran on a lent GPU machine (the session's `device` tool), kept so the figures in
# benchmarks/RESULTS.md can be traced and rerun. That machine's python3 holds a CUDA torch but no
# monai or nibabel (they travel as wheels in .whl/) and nothing of ../shared (the data travels in
# .gpudata/). Both folders are git-ignored; `benchmarks/gpu_session.sh pack` fills them here.
#
#   benchmarks/gpu_session.sh pack         # here: wheels and data into .whl/ and .gpudata/
#   benchmarks/gpu_session.sh run SECONDS  # there: GPU figures, then hippocampus recipes and the
#                                          # AL simulation in parallel, all within about SECONDS
#   benchmarks/gpu_session.sh long SECONDS EPOCHS  # there: the 16-32-64-128 network with and without
#                                          # left-right mirroring, EPOCHS each, 6 loader workers
#   benchmarks/gpu_session.sh batched SECONDS      # there: six hippocampus recipes at once with
#                                          # radiology.offline --batched (volumes and augmentation
#                                          # on the GPU), each filling the time; STEPS=N instead
#                                          # runs N steps each (a dry run, also on a CPU)
#   benchmarks/gpu_session.sh final SECONDS        # there: the 16-32-64-128 strong recipe on train+val
#   benchmarks/gpu_session.sh wide                 # there: the pathology network tests on CUDA, and the
#                                          # wider network with the stronger augmentation (best on
#                                          # validation in the batched phase) on train+val, seeds 0
#                                          # and 1 at once, 8527 steps each (as the 16-32-64-128 weights);
#                                          # seed 0 is the candidate, seed 1 shows the spread. STEPS=N
#                                          # for a dry run
#   benchmarks/gpu_session.sh seeds                # there: the same recipe on the training cases only,
#                                          # 5436 steps as its validated run, seeds 0-2 at once, last
#                                          # weights: does averaging two seeds gain on validation?
#   benchmarks/gpu_session.sh ds                   # there: the shipped recipe with deep supervision on two
#                                          # decoder levels (radiology.deep_supervision): seeds 0 and 1
#                                          # on the training cases (5436 steps, to judge on validation
#                                          # against the seeds phase) and, at the same time, seed 0 on
#                                          # train+val (8527 steps, the candidate). STEPS=N for a dry run
#   benchmarks/gpu_session.sh stronger             # there: the shipped recipe with augmentation one notch
#                                          # stronger ($STRONGER): seed 0 on the training cases (5436
#                                          # steps) and, at the same time, on train+val (8527 steps)
#   benchmarks/gpu_session.sh sgd                  # there: the shipped recipe with nnU-Net's optimiser
#                                          # (radiology.offline --optimizer sgd --lr 1e-2): seeds 0 and 1
#                                          # on the training cases (5436 steps) and, at the same time,
#                                          # seed 0 on train+val (8527 steps). STEPS=N for a dry run.
#                                          # Its rule in RESULTS.md (one network against one) is
#                                          # superseded: hippocampus now averages four networks, so
#                                          # commit a new rule (an SGD network as a member) first
#
# The recipes' epoch counts come from a 3-epoch calibration of all four at once, sized to fill 65%
# of the time left (the AL simulation shares the GPU and CPUs with them); each also stops after
# the epoch that passes the end, which leaves a minute to pack the results. The one with the best
# validation Dice is brought back (its epoch count is in its history); the test split is scored
# afterwards, on the CPU, for that one only.
# Results go to $OUT (the device tool brings back at most 8 files: one tarball and the weights).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?pack or run}
OUT=${OUT:-/tmp/gpu_out}
D=${GPU_DATA:-.gpudata}
W=/tmp/gpu_work
# The "stronger" batched augmentation of the batched phase, which the final phase retrains.
STRONG='p_spatial=0.8,rotate=0.5,scale=0.75:1.3,translate=6,p_gamma=0.4,p_noise=0.2'
# One notch further (the `stronger` phase): every spatial and intensity setting raised again.
STRONGER='p_spatial=0.9,rotate=0.7,scale=0.7:1.4,translate=8,p_gamma=0.5,p_gain=0.4,gain=0.75:1.25,p_noise=0.3,noise=0.15'
# The network the hippocampus model had until 2026-11-29 (now 24,48,96,192): the phases that ran
# before then name it, so that they still train what they trained.
NARROW=16,32,64,128
mkdir -p "$OUT" "$W"

setup() {
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1 MONAI_LABEL_TRACKING_ENABLED=false
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, monai, numpy, nibabel; print('torch', torch.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" || exit 1
    echo "cpus: $(nproc)"
}

recipe() { # name epochs minutes extra-args...
    local name=$1 epochs=$2 minutes=$3
    shift 3
    python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/$name.pt" --epochs "$epochs" \
        --batch-size 4 --lr 2e-3 --val-every 10 --workers "${WORKERS:-2}" --threads 2 --seed 0 --deadline-minutes "$minutes" \
        --channels "$NARROW" "$@" \
        >"$W/$name.log" 2>&1
}

case $phase in
pack)
    mkdir -p .whl $D/totalseg_ct $D/pathology
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    grep -qx '/.gpudata/' .git/info/exclude 2>/dev/null || echo '/.gpudata/' >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl monai==1.5.2 nibabel==5.3.2
    cp -r ../shared/data/hippocampus_mr ../shared/data/spleen_ct $D/
    cp ../shared/data/totalseg_ct/example_ct_sm.nii.gz ../shared/data/totalseg_ct/example_ct.nii.gz $D/totalseg_ct/
    cp -r ../shared/data/pathology/nuclei_cpm15 $D/pathology/
    du -sh .whl $D
    ;;
run)
    end=$(($(date +%s) + ${2:?seconds for the whole run} - 60))
    setup
    echo "== GPU figures (alone on the machine)"
    timeout 150 python3 -m benchmarks.gpu --shared $D --json "$W/gpu_figures.json" >"$W/gpu_figures.log" 2>&1
    grep -v -i warn "$W/gpu_figures.log" | tail -12
    cp "$W/gpu_figures.log" "$OUT/"
    echo "== calibration: the four recipes at once, 3 epochs"
    recipe calib_base 3 3 --flip-axes '' &
    recipe calib_flip 3 3 --flip-axes 0 &
    recipe calib_wide 3 3 --flip-axes 0 --channels 24,48,96,192 &
    recipe calib_flip_s2 3 3 --flip-axes 0 --samples-per-image 2 &
    wait
    minutes=$(python3 -c "print(round(($end - $(date +%s)) / 60, 2))")
    declare -A epochs
    for r in base flip wide flip_s2; do
        sec=$(python3 -c "import json; e=json.load(open('$W/calib_$r.history.json'))['epochs']; print(max(x['seconds'] for x in e[1:]))") || {
            tail -5 "$W/calib_$r.log"
            exit 1
        }
        epochs[$r]=$(python3 -c "print(max(10, int(0.65 * $minutes * 60 / $sec) // 10 * 10))")
        echo "calibration $r: $sec s/epoch with four recipes at once -> ${epochs[$r]} epochs"
    done
    echo "== hippocampus recipes and the AL simulation, in parallel, about $minutes min"
    recipe base "${epochs[base]}" "$minutes" --flip-axes '' &
    recipe flip "${epochs[flip]}" "$minutes" --flip-axes 0 &
    recipe wide "${epochs[wide]}" "$minutes" --flip-axes 0 --channels 24,48,96,192 &
    recipe flip_s2 "${epochs[flip_s2]}" "$minutes" --flip-axes 0 --samples-per-image 2 &
    python3 -m benchmarks.al_split --source $D/hippocampus_mr --out /tmp/al_hippocampus --pool-size "${AL_POOL:-80}" >"$W/al_split.log" 2>&1
    for s in 0 1 2; do
        timeout "$(python3 -c "print(int($minutes * 60))")" python3 -m benchmarks.active_learning \
            --pool /tmp/al_hippocampus/pool --test /tmp/al_hippocampus/test \
            --strategy random,epistemic,bald,tta,diversity --initial 4 --per-round 4 --rounds 5 --seed $s \
            --initial-steps 300 --steps-per-round 100 --lr 2e-3 --mc-samples 8 --tta-samples 4 \
            --threads 1 --channels "$NARROW" --out "$W/al" >"$W/al_$s.log" 2>&1 &
    done
    wait
    python3 benchmarks/gpu_pick.py "$W" "$OUT"
    ls "$W/al/runs" 2>/dev/null | tr '\n' ' '
    tar -C "$W" -czf "$OUT/gpu_session.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
long)
    end=$(($(date +%s) + ${2:?seconds for the whole run} - 45))
    setup
    minutes=$(python3 -c "print(round(($end - $(date +%s)) / 60, 2))")
    WORKERS=6 recipe base "${3:?epochs}" "$minutes" --flip-axes '' &
    WORKERS=6 recipe flip "$3" "$minutes" --flip-axes 0 &
    wait
    python3 benchmarks/gpu_pick.py "$W" "$OUT"
    cp "$W"/base.pt "$W"/flip.pt "$OUT/"
    tar -C "$W" -czf "$OUT/gpu_long.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
batched)
    end=$(($(date +%s) + ${2:?seconds for the whole run} - 40))
    setup
    batched() { # name extra-args...
        local name=$1 plan
        shift
        if [ -n "${STEPS:-}" ]; then
            plan="--steps $STEPS"
        else
            plan="--minutes $(python3 -c "print(round(($end - $(date +%s)) / 60, 2))")"
        fi
        # shellcheck disable=SC2086 # $plan is two words
        python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/$name.pt" --batched $plan \
            --batch-size 16 --lr 2e-3 --val-every "${VAL_EVERY:-250}" --threads 1 --channels "$NARROW" "$@" >"$W/$name.log" 2>&1
    }
    batched b_base --seed 0 --flip-axes '' &
    batched b_base_s1 --seed 1 --flip-axes '' &
    batched b_strong --seed 0 --flip-axes '' --augment "$STRONG" &
    batched b_flip --seed 0 --flip-axes 0 &
    batched b_wide --seed 0 --flip-axes '' --channels 24,48,96,192 &
    batched b_wide_strong --seed 0 --flip-axes '' --channels 24,48,96,192 --augment "$STRONG" &
    wait
    grep -h -o '"seconds_per_step.*' "$W"/b_*.log
    recipes="b_base b_base_s1 b_strong b_flip b_wide b_wide_strong"
    for r in $recipes; do
        [ -f "$W/$r.pt" ] && cp "$W/$r.pt" "$OUT/" || { echo "$r failed:"; tail -5 "$W/$r.log"; }
    done
    RECIPES=${recipes// /,} python3 benchmarks/gpu_pick.py "$W" /tmp
    tar -C "$W" -czf "$OUT/gpu_batched.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
final)
    # The recipe chosen by validation in the batched phase (b_strong), alone on the GPU, trained on
    # the training and validation cases together; its last weights are the candidate.
    end=$(($(date +%s) + ${2:?seconds for the whole run} - 25))
    setup
    plan="--minutes $(python3 -c "print(round(($end - $(date +%s)) / 60, 2))")"
    [ -n "${STEPS:-}" ] && plan="--steps $STEPS"
    # shellcheck disable=SC2086 # $plan is two words
    python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/final.pt" --batched --include-val $plan \
        --batch-size 16 --lr 2e-3 --val-every 500 --threads 2 --seed 0 --flip-axes '' --channels "$NARROW" \
        --augment "$STRONG" >"$W/final.log" 2>&1
    tail -3 "$W/final.log"
    cp "$W/final.last.pt" "$W/final.history.json" "$W/final.log" "$OUT/"
    ;;
wide)
    setup
    # The network-level pathology tests (no MONAI Label there), on the GPU beside the training.
    SHARED_DATA=$D timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_pathology_network.py \
        >"$OUT/pathology_cuda.log" 2>&1 &
    wide() { # seed
        python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/wide_s$1.pt" --batched --include-val \
            --steps "${STEPS:-8527}" --batch-size 16 --lr 2e-3 --val-every 500 --threads 2 --seed "$1" --flip-axes '' \
            --channels 24,48,96,192 --augment "$STRONG" >"$W/wide_s$1.log" 2>&1
    }
    wide 0 &
    wide 1 &
    wait
    tail -n 3 "$OUT/pathology_cuda.log" "$W"/wide_s*.log
    for s in 0 1; do cp "$W/wide_s$s.last.pt" "$OUT/" || tail -5 "$W/wide_s$s.log"; done
    tar -C "$W" -czf "$OUT/gpu_wide.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
seeds)
    setup
    for s in 0 1 2; do
        python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/seed$s.pt" --batched \
            --steps "${STEPS:-5436}" --batch-size 16 --lr 2e-3 --val-every "${STEPS:-5436}" --threads 2 --seed "$s" \
            --flip-axes '' --channels 24,48,96,192 --augment "$STRONG" >"$W/seed$s.log" 2>&1 &
    done
    wait
    tail -n 1 "$W"/seed?.log
    for s in 0 1 2; do cp "$W/seed$s.last.pt" "$OUT/" || tail -5 "$W/seed$s.log"; done
    tar -C "$W" -czf "$OUT/gpu_seeds.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
ds | stronger | sgd)
    setup
    # Each job is cut off in time so that the logs come back within the device call's limit; a job
    # cut off leaves no .last.pt and so nothing to judge.
    job() { # name steps seed extra-args...
        local name=$1 steps=$2 seed=$3
        shift 3
        timeout "${JOB_SECONDS:-500}" python3 -m radiology.offline hippocampus --data $D/hippocampus_mr --out "$W/$name.pt" \
            --batched --steps "$steps" --batch-size 16 --lr 2e-3 --val-every "$steps" --threads 2 --seed "$seed" \
            --flip-axes '' --channels 24,48,96,192 "$@" >"$W/$name.log" 2>&1
    }
    if [ "$phase" = ds ]; then
        names="ds_s0 ds_s1 ds_final"
        job ds_s0 "${STEPS:-5436}" 0 --augment "$STRONG" --deep-supervision 2 &
        job ds_s1 "${STEPS:-5436}" 1 --augment "$STRONG" --deep-supervision 2 &
        job ds_final "${STEPS:-8527}" 0 --augment "$STRONG" --deep-supervision 2 --include-val &
    elif [ "$phase" = stronger ]; then
        names="st_s0 st_final"
        job st_s0 "${STEPS:-5436}" 0 --augment "$STRONGER" &
        job st_final "${STEPS:-8527}" 0 --augment "$STRONGER" --include-val &
    else
        # job passes --lr 2e-3 first; the later --lr wins (argparse keeps the last value).
        names="sgd_s0 sgd_s1 sgd_final"
        job sgd_s0 "${STEPS:-5436}" 0 --augment "$STRONG" --optimizer sgd --lr 1e-2 &
        job sgd_s1 "${STEPS:-5436}" 1 --augment "$STRONG" --optimizer sgd --lr 1e-2 &
        job sgd_final "${STEPS:-8527}" 0 --augment "$STRONG" --optimizer sgd --lr 1e-2 --include-val &
    fi
    wait
    for name in $names; do
        tail -n 1 "$W/$name.log"
        cp "$W/$name.last.pt" "$OUT/" || tail -5 "$W/$name.log"
    done
    tar -C "$W" -czf "$OUT/gpu_$phase.tgz" --exclude='*.pt' . && ls -la "$OUT"
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
