#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 60 s each), seeded from the
# corpus in fuzz/corpus/<target>/ (read only). New inputs libFuzzer finds go to
# fuzz/target/new-corpus/<target>/ (add the interesting ones to the corpus by hand);
# crashes go to fuzz/artifacts/<target>/ and fail the script.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly compiler, or the stable one
# with RUSTC_BOOTSTRAP=1 (set below) for the sanitizer flags.
#   fuzz/run.sh            # 60 s per target
#   fuzz/run.sh 300        # 5 min per target
# fuzz/capture.py re-captures real ClientHellos (openssl, psql, curl) into the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
status=0
for target in client_hello proxy_header; do
  echo "== $target: ${seconds}s"
  mkdir -p "fuzz/target/new-corpus/$target" "fuzz/artifacts/$target"
  if ! cargo fuzz run "$target" "fuzz/target/new-corpus/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -max_len=20000 -timeout=10 -print_final_stats=1; then
    echo "== $target: FAILED, see fuzz/artifacts/$target" >&2
    status=1
  fi
done
exit "$status"
