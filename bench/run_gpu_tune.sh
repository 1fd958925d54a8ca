#!/usr/bin/env bash
# A GPU session's second run, after bench/run_gpu.sh: the cross-entropy launch searches that wait
# for a GPU (bench/NOTES.md, "Next steps", items 0, 7 and 8), kernel alone, each group bounded in time
# (seconds, overridable) so that the whole fits a 10-minute slot (the limits add up to 580 s):
#   1. short rows, in one chunk (--cases short): the warps that share a row (SINGLE_ROW_VALUES) and
#      the rows a program (ROWS_VALUES, ROWS_MAX_BLOCK); if the launches before them win (rows 1,
#      warps block // 256), set SINGLE_ROW_VALUES back to 8 or ROWS_MAX_BLOCK to 0;
#   2. the segmentation map (--cases seg): the columns kernel on the contiguous and the channels_last
#      map against the rows kernel on the same channels_last memory (_COLUMNS_MAX_ROW_COST);
#   3. softcap (--cases softcap): its launch, plain cross-entropy's by default;
#   4. GPT-2's vocabulary (--cases 50257): rows off 16-byte boundaries, swept from the boundaries before
#      them (SHIFT, bench/NOTES.md section 30), at the default launch of their V and around it;
#   5. OUT/tune.tgz, which unpacks into bench/results/ (tune_short.json, tune_seg.json,
#      tune_softcap.json, tune_50257.json: every launch tried, each saved after every case, so a group
#      cut short keeps what it measured).
# Each group searches one round from the default launch (python -m bench.tune_ce --rounds 1); a case
# past its group's budget times its default launch only.
# Usage: bash bench/run_gpu_tune.sh [OUT]   (the project installed, as for bench/run_gpu.sh)
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out/results"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

tune() {  # group, search budget (s), time limit (s)
    timeout "$3" $py -m bench.tune_ce --cases "$1" --rounds 1 --budget-s "$2" \
        --save "$out/results/tune_$1.json" >"$out/tune_$1.log" 2>&1
    echo "== tune_ce --cases $1 (exit $?)"
    grep -A20 "^case " "$out/tune_$1.log" || tail -12 "$out/tune_$1.log"
}
tune short "${SHORT_S:-170}" "${SHORT_LIMIT_S:-200}"
tune seg "${SEG_S:-110}" "${SEG_LIMIT_S:-150}"
tune softcap "${SOFTCAP_S:-100}" "${SOFTCAP_LIMIT_S:-140}"
tune 50257 "${V50257_S:-60}" "${V50257_LIMIT_S:-90}"
tar czf "$out/tune.tgz" -C "$out" results && rm -rf "$out/results"
