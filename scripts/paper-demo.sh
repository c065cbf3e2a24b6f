#!/usr/bin/env bash
# The quick paper path (`scripts/demo.sh --paper`): install, infer the stalls of the paper's shipped
# traces with both estimators, score them against the spinner ground truth and
# plot the result. Output under results/paper-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
out="results/paper-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
ctl=.venv/bin/iqn-ctl
for genre in news music; do
  d=data/paper/$genre
  for est in paper count; do
    $ctl replay "$d/timestamp_of_candidate.txt" --estimator "$est" --json > "$out/$genre-$est.jsonl"
    echo "== $genre, estimator $est"
    $ctl evaluate --truth "$d/Real_stalls.txt" "$out/$genre-$est.jsonl" \
      --plot "$out/$genre-$est.png" --candidates "$d/timestamp_of_candidate.txt"
  done
done
echo "results in $out/"
