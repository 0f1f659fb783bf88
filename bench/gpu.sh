#!/usr/bin/env bash
# Every check that needs a GPU, in one run (under ~8 minutes on one H100/H200), ending in one table:
#   - the GPU-marked tests (pytest -m gpu)
#   - bf16 training MFU: herd-1b at seq 8192 (activation checkpointing) and herd-100m at seq 2048
#   - FlexAttention document masks, compiled, equal to per-document attention
#   - batch-1 decode tokens/s of herd-100m (bf16, compiled) against the memory-bandwidth bound
#   - FSDP2 on NCCL (`herd pretrain --dp N` under torchrun) when there is more than one GPU
#
#   bash bench/gpu.sh             # on a GPU machine
#   bash bench/gpu.sh --dry-run   # tiny shapes on a CPU: checks the script itself (tests run this)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results="$work/results.jsonl"
: > "$results"

# run NAME TIMEOUT_S CMD...: the command prints one JSON line; a failure becomes a failed row
run() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if out=$(timeout "$limit" "$@" 2> "$work/$name.err" | tail -n 1) && [ -n "$out" ]; then
    echo "$out" | "$PY" -c "import json,sys; r=json.loads(sys.stdin.read()); r['s']=$((SECONDS-start)); print(json.dumps(r))" >> "$results"
  else
    local why; why=$(tail -n 1 "$work/$name.err" | tr -d '"\\' | cut -c1-120)
    echo "{\"check\": \"$name\", \"ok\": false, \"error\": \"$why\", \"s\": $((SECONDS-start))}" >> "$results"
  fi
}

if [ -n "$DRY" ]; then
  run gpu-tests 120 "$PY" -c "import subprocess,sys,json; p=subprocess.run([sys.executable,'-m','pytest','-q','-m','gpu','--co','-p','no:cacheprovider'],capture_output=True,text=True); n=sum(1 for l in p.stdout.splitlines() if '::' in l); print(json.dumps({'check':'gpu tests (collected, dry)','ok':p.returncode==0 and n>0,'tests':n}))"
  run mfu-small 300 "$PY" bench/gpu_checks.py mfu $DRY
else
  run gpu-tests 300 "$PY" -c "import subprocess,sys,json,re; p=subprocess.run([sys.executable,'-m','pytest','-q','-m','gpu','-p','no:cacheprovider'],capture_output=True,text=True); t=p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-200:]; print(json.dumps({'check':'gpu tests','ok':p.returncode==0,'summary':t}))"
  run mfu-herd-1b 300 "$PY" bench/gpu_checks.py mfu --preset herd-1b --seq-len 8192 --batch-size 1 --activation-checkpointing
  run mfu-herd-100m 240 "$PY" bench/gpu_checks.py mfu --preset herd-100m --seq-len 2048 --batch-size 8
fi
run flex 240 "$PY" bench/gpu_checks.py flex $DRY
run decode 240 "$PY" bench/gpu_checks.py decode --preset herd-100m $DRY

ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$ngpu" -gt 1 ] && [ -z "$DRY" ]; then
  "$PY" bench/gpu_checks.py fsdp-data "$work/shards" --preset herd-100m > /dev/null
  run fsdp-nccl 240 "$PY" -c "
import json, subprocess, sys
p = subprocess.run(['torchrun', '--standalone', '--nproc-per-node', '$ngpu', '--no-python', 'herd', 'pretrain',
                    '--data', '$work/shards', '--out', '$work/fsdp', '--preset', 'herd-100m', '--dp', '$ngpu',
                    '--steps', '20', '--batch-size', '$((ngpu * 8))', '--seq-len', '2048', '--compile', '--tensorboard',
                    'false', '--eval-every', '0', '--log-every', '5'], capture_output=True, text=True)
rows = [json.loads(l) for l in open('$work/fsdp/log.jsonl') if '\"train\"' in l] if p.returncode == 0 else []
tail = rows[-5:]
print(json.dumps({'check': 'fsdp2 nccl herd-100m x $ngpu', 'ok': p.returncode == 0,
                  'tokens_per_s': round(sum(r['tokens_per_s'] for r in tail) / max(len(tail), 1)),
                  'mfu': round(sum(r['mfu'] for r in tail) / max(len(tail), 1), 4), 'error': p.stderr[-150:] if p.returncode else ''}))"
else
  echo "{\"check\": \"fsdp2 nccl\", \"ok\": true, \"skipped\": \"$( [ -n "$DRY" ] && echo dry run || echo "$ngpu GPU(s)")\"}" >> "$results"
fi

"$PY" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'check':<44}{'ok':<6}{'s':>5}  result")
for r in rows:
    rest = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("check", "ok", "s") and v not in (None, ""))
    print(f"{r['check'][:43]:<44}{'yes' if r.get('ok') else 'NO':<6}{r.get('s', ''):>5}  {rest}")
sys.exit(0 if all(r.get("ok") for r in rows) else 1)
PY
