#!/usr/bin/env bash
# The API from a shell: submit with curl, follow the SSE stream to its end, download the image
# through the redirect and check its sha256. Needs API (base URL) and KEY; prints "ok JOB".
set -euo pipefail
auth="Authorization: Bearer $KEY"
job=$(curl -sS --fail-with-body -H "$auth" -H 'Content-Type: application/json' \
  -d '{"prompt": "a blue circle, from curl", "width": 128, "height": 128, "num_inference_steps": 3, "seed": 5}' \
  "$API/v1/jobs" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
events=$(curl -sS -N --fail-with-body --max-time 120 -H "$auth" "$API/v1/jobs/$job/events")
last=$(printf '%s\n' "$events" | grep '^event: ' | tail -1)
[ "$last" = "event: succeeded" ] || { echo "stream ended with: $last" >&2; exit 1; }
printf '%s\n' "$events" | grep -q '^data: {"state":"running","step":3,' || { echo "no step 3 event" >&2; exit 1; }
final=$(printf '%s\n' "$events" | grep '^data: ' | tail -1 | cut -c7-)
want=$(printf '%s' "$final" | python3 -c 'import json, sys; print(json.load(sys.stdin)["images"][0]["sha256"])')
code=$(curl -sS -o /dev/null -w '%{http_code} %{redirect_url}' -H "$auth" "$API/v1/jobs/$job/images/0")
[ "${code%% *}" = "302" ] || { echo "image answered $code" >&2; exit 1; }
curl -sS --fail -o "$OUT/curl.png" "${code#* }"
got=$(sha256sum "$OUT/curl.png" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "sha256 $got != $want" >&2; exit 1; }
echo "ok $job"
