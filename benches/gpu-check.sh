#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU (about 10 minutes on one H200). Run from the repository
# root with a binary built elsewhere with `cargo build --release --features cuda` (and stripped):
#
#     BIN=target/release/med-rlvr OUT=/tmp/gpu-check bash benches/gpu-check.sh
#
# Writes $OUT/gpu-check.json and $OUT/gpu-check.md (plus each part's raw output) with:
#   1. the environment: GPU, driver and its CUDA version, libnvrtc, CUDA headers (cubecl-cuda
#      compiles its kernels at run time with nvrtc and needs $CUDA_PATH/include);
#   2. the differential self-check (`med-rlvr selfcheck`): the model, trainer and sampler entry
#      points on this GPU against the CPU reference compiled into the same binary, over a sweep of
#      shapes — first, because every later number depends on it ("are the numbers right" before
#      "how fast");
#   3. parity: `logprobs` of the transformers fixtures (tests/fixtures/qwen2/*) on CUDA against
#      the reference log-probs;
#   4. decode throughput of the Qwen2.5-3B geometry (random weights, bf16: `bench --dtype bf16`) at
#      64 and 256 rows against the bandwidth bound and against transformers on the same GPU;
#   5. one PPO step of the 3B preset on random weights (benches/ppo_step.py): phase_seconds and
#      peak GPU memory, next to transformers' forward+backward of one micro-batch.
# On a machine without a GPU it says so in one line and exits with status 2. SMOKE=1 runs only the
# self-check, the parity part and the summary with whatever binary BIN is (a CPU build), to check the script.
set -uo pipefail
SMOKE=${SMOKE:-0}
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/med-rlvr}
OUT=${OUT:-gpu-check-out}
BANDWIDTH_TBS=${BANDWIDTH_TBS:-4.8}   # H200 HBM3e; an H100 SXM is 3.35

if [ "$SMOKE" != 1 ] && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi is missing or lists no device); nothing to measure" >&2
    exit 2
fi
if [ ! -x "$BIN" ]; then
    echo "gpu-check: $BIN is not an executable; build it with: cargo build --release --features cuda" >&2
    exit 2
fi
mkdir -p "$OUT"

if [ "$SMOKE" = 1 ]; then echo "smoke run: no GPU checks" > "$OUT/env.txt"; fi
# 1. Environment. The CUDA bindings must match the driver (cudarc: CUDARC_CUDA_VERSION at build
#    time); nvrtc and the headers may come from a CUDA toolkit or from PyTorch's nvidia-* wheels.
[ "$SMOKE" = 1 ] || {
DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
NVRTC=$( (ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF; exit}') || true)
if [ -z "$NVRTC" ]; then
    NVRTC=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    hits = sorted(glob.glob(os.path.join(d, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    if hits:
        print(hits[0]); break
EOF
)
fi
[ -n "$NVRTC" ] && export LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}"
if [ -z "${CUDA_PATH:-}" ] || [ ! -f "$CUDA_PATH/include/cuda.h" ]; then
    for c in /usr/local/cuda /usr/local/cuda-*; do
        [ -f "$c/include/cuda.h" ] && export CUDA_PATH="$c" && break
    done
fi
if [ -z "${CUDA_PATH:-}" ] || [ ! -f "$CUDA_PATH/include/cuda.h" ]; then
    H=$(python3 -c "import glob,site,os;print(next(iter(sorted(glob.glob(os.path.join(site.getsitepackages()[0],'nvidia','**','include','cuda.h'),recursive=True))),''))" 2>/dev/null)
    [ -n "$H" ] && export CUDA_PATH="$(dirname "$(dirname "$H")")"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "driver CUDA version: ${DRIVER_CUDA:-unknown}"
    echo "libnvrtc: ${NVRTC:-not found}"
    echo "CUDA_PATH: ${CUDA_PATH:-not found} (cuda.h: $([ -f "${CUDA_PATH:-/nonexistent}/include/cuda.h" ] && echo yes || echo no))"
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if [ -z "$NVRTC" ] || [ ! -f "${CUDA_PATH:-/nonexistent}/include/cuda.h" ]; then
    echo "gpu-check: libnvrtc or the CUDA headers are missing (see $OUT/env.txt); install a CUDA toolkit or set CUDA_PATH and LD_LIBRARY_PATH" >&2
    exit 2
fi
}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}

# 2. The differential self-check, on the build's backend against ndarray.
timeout 300 "$BIN" selfcheck --cases "${SELFCHECK_CASES:-24}" > "$OUT/selfcheck.txt" 2>&1
echo $? > "$OUT/selfcheck.rc"
tail -n 1 "$OUT/selfcheck.txt"

# 3. Parity with the transformers fixtures.
for f in tests/fixtures/qwen2/*/; do
    name=$(basename "$f")
    python3 - "$f" > "$OUT/parity-$name.args" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1] + "reference.json"))["text"]
print(json.dumps({"prompt": t["prompt"], "continuation": t["continuation"]}))
EOF
    P=$(python3 -c "import json,sys;print(json.load(open('$OUT/parity-$name.args'))['prompt'])")
    C=$(python3 -c "import json,sys;print(json.load(open('$OUT/parity-$name.args'))['continuation'])")
    timeout 300 "$BIN" logprobs --model "$f" --prompt "$P" --continuation "$C" --json \
        > "$OUT/parity-$name.json" 2> "$OUT/parity-$name.err"
done

# 4. Decode throughput: med-rlvr and transformers on the same GPU.
[ "$SMOKE" = 1 ] || for rows in 64 256; do
    timeout 240 "$BIN" bench --config assets/configs/qwen2.5-3b.json --dtype bf16 --batch $rows \
        --prompt-len 128 --new-tokens 32 --json > "$OUT/bench-$rows.json" 2> "$OUT/bench-$rows.err"
    timeout 240 python3 benches/torch_reference.py --config assets/configs/qwen2.5-3b.json --batch $rows \
        --prompt-len 128 --new-tokens 32 --device cuda --dtype bfloat16 \
        > "$OUT/torch-$rows.json" 2> "$OUT/torch-$rows.err"
done

# 5. One PPO step of the 3B preset on random weights.
[ "$SMOKE" = 1 ] || timeout 600 python3 benches/ppo_step.py --bin "$BIN" --geometry assets/configs/qwen2.5-3b.json \
    --preset assets/presets/med-rlvr-qwen2.5-3b.toml --prompts 64 --new-tokens 256 --device cuda \
    > "$OUT/ppo-step.json" 2> "$OUT/ppo-step.err"

# Summary.
OUT="$OUT" BANDWIDTH_TBS="$BANDWIDTH_TBS" python3 - <<'EOF'
import glob, json, os
out, bw = os.environ["OUT"], float(os.environ["BANDWIDTH_TBS"]) * 1e12
def load(p):
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": f"{os.path.basename(p)}: {e}; see the .err file"}
res = {"env": open(os.path.join(out, "env.txt")).read().splitlines(), "parity": {}, "decode": {}}
sc = open(os.path.join(out, "selfcheck.txt")).read().strip().splitlines()
res["selfcheck"] = {"exit": int(open(os.path.join(out, "selfcheck.rc")).read()),
                    "summary": sc[-1] if sc else "no output",
                    "failures": [l.strip() for l in sc if l.startswith("FAIL") or l.startswith("       ")]}
def max_abs_diff(got, want):
    # Fails loudly on a length mismatch or a non-finite value (never max() over NaN).
    if got is None or len(got) != len(want):
        return f"length {None if got is None else len(got)} where {len(want)} was expected"
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a is None or not (abs(a) < float("inf"))]
    if bad:
        return f"non-finite at positions {bad}"
    return max(abs(a - b) for a, b in zip(got, want))
for f in sorted(glob.glob("tests/fixtures/qwen2/*/")):
    name = os.path.basename(f.rstrip("/"))
    want = json.load(open(f + "reference.json"))["text"]["continuation_logprobs"]
    got = load(os.path.join(out, f"parity-{name}.json"))
    lp = got.get("continuation_logprobs")
    res["parity"][name] = {"max_abs_diff": max_abs_diff(lp, want)} if "continuation_logprobs" in got else got
# 3B geometry: bf16 weights = 2 bytes x 3.09e9; our KV cache is f32: 72 KiB per cached token.
weights, kv_per_token = 3.09e9 * 2, 36 * 1024 * 2
for rows in (64, 256):
    ours, ref = load(os.path.join(out, f"bench-{rows}.json")), load(os.path.join(out, f"torch-{rows}.json"))
    ctx = 128 + 16
    floor = rows / ((weights + rows * ctx * kv_per_token) / bw)
    res["decode"][rows] = {"med_rlvr": ours, "transformers": ref, "bandwidth_floor_tok_s": floor}
res["ppo_step"] = load(os.path.join(out, "ppo-step.json"))
json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
with open(os.path.join(out, "gpu-check.md"), "w") as md:
    md.write("# gpu-check\n\n" + "\n".join("    " + l for l in res["env"]) + "\n\n")
    md.write(f"selfcheck (exit {res['selfcheck']['exit']}): {res['selfcheck']['summary']}\n\n")
    for l in res["selfcheck"]["failures"][:20]:
        md.write(f"    {l}\n")
    md.write("| fixture | max abs log-prob diff vs transformers |\n|---|---|\n")
    for k, v in res["parity"].items():
        md.write(f"| {k} | {v.get('max_abs_diff', v)} |\n")
    md.write("\n| rows | med-rlvr decode tok/s | transformers decode tok/s | bandwidth bound: max tok/s at the time floor (bf16 weights, f32 KV) |\n|---|---|---|---|\n")
    for rows, d in res["decode"].items():
        md.write(f"| {rows} | {d['med_rlvr'].get('decode_tok_s')} | {d['transformers'].get('decode_tok_s')} | {d['bandwidth_floor_tok_s']:.0f} |\n")
    md.write("\nPPO step: " + json.dumps(res["ppo_step"]) + "\n")
print(open(os.path.join(out, "gpu-check.md")).read())
EOF
