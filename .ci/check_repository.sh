#!/usr/bin/env bash
# No tracked file over 2 MB outside sample_scans/ and medsr/weights/ (wheels, caches, run
# folders and volumes belong elsewhere); run from the repository root.
set -euo pipefail
limit=$((2 * 1024 * 1024))
status=0
while IFS= read -r -d '' path; do
    case "$path" in sample_scans/*|medsr/weights/*) continue ;; esac
    [ -f "$path" ] || continue
    size=$(stat -c %s "$path")
    if [ "$size" -gt "$limit" ]; then
        echo "error: $path is tracked and $((size / 1024 / 1024)) MB; files over 2 MB belong in sample_scans/ or medsr/weights/ (or not in git)" >&2
        status=1
    fi
done < <(git ls-files -z)
exit $status
