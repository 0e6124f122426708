#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command, for a GPU machine that is lent
# for minutes: the Triton kernel's tests on the GPU, the MoE layer against dense, the 30-line
# reference and Hugging Face (with a profile of the worst shape), end-to-end training
# throughput and MFU (plain loop, bare and user's run side by side) compiled per block and
# whole, and the platform's own train.py on the GPU. Each step has its own time limit, so one
# slow step costs only itself. The default steps fit a 15-minute lease; the others run when named.
#
#     bash scripts/gpu_checks.sh [log folder]      # default outputs/gpu_checks
#     STEPS="layer train_eager" bash scripts/gpu_checks.sh    # some steps only
#
# Logs: <folder>/<step>.log; the tables and each step's exit status also go to stdout.
set -u
LOGS=${1:-outputs/gpu_checks}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    grep -E '^(\||device:|profile:|val/|test/|train/)|Error|error:' "$LOGS/$name.log" | grep -v -E 'Warning|warn' | tail -n 45
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

latest_metrics() {  # the newest run's metrics.json, if any
    local f
    f=$(ls -t outputs/*/*/metrics.json 2>/dev/null | head -n 1)
    [ -n "$f" ] && echo "$f: $(tr -d '\n' <"$f")"
}

python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), "cuda", torch.version.cuda)' \
    | tee "$LOGS/env.log"

STEPS=${STEPS:-kernels layer train_compiled train_model}
for name in $STEPS; do
    case $name in
    kernels) step kernels 120 python3 -m pytest -q -p no:cacheprovider tests/moe/test_kernels.py ;;
    grouped_mm) step grouped_mm 60 python3 scripts/grouped_mm_dtypes.py ;;
    layer) step layer 150 python3 scripts/bench_moe_layer.py --compile --profile ;;
    train_eager) step train_eager 200 python3 scripts/bench_train.py --random-tokens outputs/random_tokens --profile ;;
    train_compiled) step train_compiled 240 python3 scripts/bench_train.py --random-tokens outputs/random_tokens --compile ;;
    train_model) step train_model 240 python3 scripts/bench_train.py --random-tokens outputs/random_tokens --compile-model ;;
    lm_pystdlib) step lm_pystdlib 90 python3 train.py experiment=lm_pystdlib trainer=gpu && latest_metrics ;;
    vit_gpu) step vit_gpu 50 python3 train.py trainer=gpu && latest_metrics ;;
    fsdp_ep) step fsdp_ep 50 python3 train.py trainer=fsdp_ep ep=1 trainer.max_epochs=3 && latest_metrics ;;
    *) echo "unknown step $name" ;;
    esac
done
