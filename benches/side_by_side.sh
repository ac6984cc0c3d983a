#!/usr/bin/env bash
# Issue 29's throughput table, measured side by side in one run on the machine at hand: med-rlvr
# (`$BIN`, and `$OLD` when given, e.g. the binary before a change) against PyTorch/transformers
# (`$PY benches/torch_reference.py --threads $THREADS`), random Qwen2.5-0.5B geometry, f32, the
# programs alternating, `$REPS` runs each. Prints a markdown table of medians (and every run).
#
#   BIN=target/release/med-rlvr OLD=/tmp/med-rlvr-before PY=python3 bash benches/side_by_side.sh
set -euo pipefail
BIN=${BIN:-target/release/med-rlvr}
OLD=${OLD:-}
PY=${PY:-python3}
THREADS=${THREADS:-2}
REPS=${REPS:-2}
CONFIG=${CONFIG:-assets/configs/qwen2.5-0.5b.json}
cd "$(dirname "$0")/.."

# bench arguments (the same for both programs) | rows: name=JSON key; ...
CASES=(
  "--batch 1 --prompt-len 128 --new-tokens 16|prefill tok/s, batch 1=prefill_tok_s;decode tok/s, batch 1=decode_tok_s"
  "--batch 8 --prompt-len 128 --new-tokens 16|prefill tok/s, batch 8=prefill_tok_s;decode tok/s, batch 8=decode_tok_s"
  "--rollout --batch 8 --prompt-len 32 --new-tokens 32|rollout tok/s, 8 prompts=generated_tok_s"
  "--rollout --batch 32 --prompt-len 32 --new-tokens 32|rollout tok/s, 32 prompts=generated_tok_s"
)

field() { "$PY" -c 'import json,sys; print("%.1f" % json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

declare -A RUNS
programs=(new torch)
[ -n "$OLD" ] && programs=(old new torch)
ROWS=()
for c in "${CASES[@]}"; do
  IFS='|' read -r args rows <<<"$c"
  IFS=";" read -ra rows <<<"$rows"
  ROWS+=("${rows[@]}")
  for _ in $(seq "$REPS"); do
    for p in "${programs[@]}"; do
      case $p in
        old) out=$("$OLD" bench --config "$CONFIG" $args --json 2>/dev/null) ;;
        new) out=$("$BIN" bench --config "$CONFIG" $args --json 2>/dev/null) ;;
        torch) out=$("$PY" benches/torch_reference.py --config "$CONFIG" $args --threads "$THREADS" 2>/dev/null) ;;
      esac
      for r in "${rows[@]}"; do
        RUNS["${r%=*}|$p"]+="$(echo "$out" | field "${r#*=}") "
      done
    done
  done
done

header="| | med-rlvr |"; rule="|---|---|"
[ -n "$OLD" ] && header="| | med-rlvr before | med-rlvr |" && rule="|---|---|---|"
echo "$header PyTorch $THREADS threads | ratio |"
echo "$rule---|---|"
for r in "${ROWS[@]}"; do
  name=${r%=*}
  row="| $name |"
  for p in "${programs[@]}"; do
    # shellcheck disable=SC2086
    m=$(median ${RUNS["$name|$p"]})
    row+=" $m (${RUNS["$name|$p"]% }) |"
    [ "$p" = new ] && new=$m
    [ "$p" = torch ] && torch=$m
  done
  echo "$row $(awk -v a="$new" -v b="$torch" 'BEGIN {printf "%.2f×", a / b}') |"
done
