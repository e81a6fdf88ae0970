#!/usr/bin/env bash
# Builds the API documentation of the library products (swift-docc-plugin,
# archives in .build/docs) with DocC's warnings as errors (a link that does not
# resolve, a parameter documented that does not exist or missing from a
# `- Parameters:` list), then fails if a public declaration has no doc comment.
# A member that implements a protocol requirement and says nothing of its own
# inherits the requirement's doc (`rawValue`, `description`): that counts.
# With --report, prints the undocumented declarations and their count per
# module without failing (to measure coverage).
set -euo pipefail
cd "$(dirname "$0")/.."
modules=(Userfaultfd BrokerProtocol ClientSDK PluginSDK)
report=false
[[ "${1:-}" == "--report" ]] && report=true

targets=()
for module in "${modules[@]}"; do targets+=(--target "$module"); done
warnings=(--warnings-as-errors)
$report && warnings=()
# The plugin writes each module's symbol graphs under .build/<triple>/extracted-symbols/<package>/<module>;
# cleared first so that a file removed from a module leaves no stale graph behind.
rm -rf .build/*/extracted-symbols
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! swift package --allow-writing-to-directory .build/docs generate-documentation "${targets[@]}" \
    --output-path .build/docs --disable-indexing --experimental-skip-synthesized-symbols "${warnings[@]}" >"$log" 2>&1; then
  cat "$log" >&2
  echo "check-docs: the documentation does not build cleanly" >&2
  exit 1
fi
grep -E "warning:|error:" "$log" >&2 || true

python3 - "$report" "${modules[@]}" <<'EOF'
import glob, json, sys

report, modules = sys.argv[1] == "true", sys.argv[2:]
missing = 0
for module in modules:
    files = glob.glob(f".build/*/extracted-symbols/*/{module}/*.symbols.json")
    if not files:
        sys.exit(f"check-docs: no symbol graph for {module}")
    undocumented = set()
    for path in files:
        for symbol in json.load(open(path))["symbols"]:
            if symbol["accessLevel"] not in ("public", "open"):
                continue
            if "::SYNTHESIZED::" in symbol["identifier"]["precise"] or symbol["kind"]["identifier"] == "swift.extension":
                continue  # the standard library's default implementations; extension blocks
            if not any(line["text"].strip() for line in symbol.get("docComment", {}).get("lines", [])):
                location = symbol.get("location", {})
                where = location.get("uri", "").split("/Sources/")[-1]
                line = location.get("position", {}).get("line", -1) + 1
                undocumented.add((f"Sources/{where}", line, ".".join(symbol["pathComponents"])))
    print(f"{module}: {len(undocumented)} public declarations without a doc comment")
    for where, line, name in sorted(undocumented):
        print(f"  {where}:{line}: {name}")
    missing += len(undocumented)
if missing and not report:
    sys.exit(f"check-docs: {missing} public declarations without a doc comment")
EOF
$report || echo "API documentation built in .build/docs; every public declaration documented"
