#!/usr/bin/env bash
# Shows that the engine's simulation catches bugs: reintroduces, one at a
# time, bugs the engine once had or could have, runs `uffd-sim` over 1,000
# seeds, and restores the source. Each must fail (and print the seed that
# caught it, with its replay command). Run from a clean work tree.
set -euo pipefail
cd "$(dirname "$0")/.."
git diff --quiet -- Sources || { echo "Sources has uncommitted changes: commit or stash them first" >&2; exit 2; }
trap 'git checkout -- Sources' EXIT
mutate() {  # name, file, old text, new text
  python3 - "$2" "$3" "$4" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
assert old in text, f"{path}: the text to mutate is gone; update scripts/sim-mutations.sh"
open(path, "w").write(text.replace(old, new, 1))
PY
  swift build -c release --product uffd-sim >/dev/null
  if out=$("$(swift build -c release --show-bin-path)/uffd-sim" --seeds 1000 --steps 10000); then
    echo "NOT CAUGHT: $1"; exit 1
  fi
  echo "caught: $1 -- $(echo "$out" | grep -m1 '^seed ' | cut -c1-160)"
  git checkout -- Sources
}
mutate "stale decision applied" Sources/BrokerCore/Engine/BrokerEngine+Faults.swift \
  "if client.invalidations.isStale(range, since: sequence) {" "if false && client.invalidations.isStale(range, since: sequence) {"
mutate "EEXIST at a prefetch's first page ends the fault" Sources/BrokerCore/Engine/BrokerEngine+Faults.swift \
  "if order.range.count > order.pageSize, outcome != .done, outcome != .notNow {" "if false, order.range.count > order.pageSize, outcome != .done, outcome != .notNow {"
mutate "trailing UNMAP applied late" Sources/BrokerCore/Regions/RegionTable.swift \
  "    if let index = movedAway.firstIndex(of: range) {" "    if false, let index = movedAway.firstIndex(of: range) {"
mutate "a Closed lost" Sources/BrokerCore/Engine/BrokerEngine+Clients.swift \
  "for name in client.servedBy.sorted() {" "for name in client.servedBy.sorted().dropFirst() {"
mutate "drops not replayed to a restarted plugin" Sources/BrokerCore/Engine/BrokerEngine+Plugins.swift \
  "dropped += droppedEvents(of: spec, client: client)" "dropped += droppedEvents(of: spec, client: client).prefix(0)"
mutate "a forked child's region offered again as a copy of its parent's as it is now" Sources/BrokerCore/Engine/BrokerEngine+Clients.swift \
  "let forkedFrom = client.pendingOpen?.awaiting.contains(spec.id) == true ? client.parentID : 0" "let forkedFrom = client.parentID"
mutate "a parent's drops told before its forked child's region is opened" Sources/BrokerCore/Engine/BrokerEngine+Plugins.swift \
  "dropped += droppedEvents(of: spec, client: client)" "for event in droppedEvents(of: spec, client: client) { actions.append(.send(plugin.id, event)) }"
mutate "a forked child's drop record reset to what its parent re-attached with" Sources/BrokerCore/Engine/BrokerEngine+Clients.swift \
  "      if !client.isForkedChild {" "      if true {"
mutate "a re-attaching client's threads woken only where its regions lie now" Sources/BrokerCore/Engine/BrokerEngine+Clients.swift \
  "    actions.append(.wake(client.id, Self.probeAddress..<Self.userAddressEnd))" ""
mutate "a second fault in a grown tail failed closed once the first's inspection placed it" Sources/BrokerCore/Engine/BrokerEngine+Faults.swift \
  "    if client.regions.piece(containing: page) != nil { return routeFault(fault) }" ""
mutate "a prefetch filled over pages no one can vouch for" Sources/BrokerCore/Engine/BrokerEngine+Faults.swift \
  "      range = page..<page + UInt(pageSize)" ""
mutate "a re-attaching client ignores its read journal (drops of a read the killed broker never told)" Sources/BrokerProtocol/Messages/UnsettledRead.swift \
  "    case .removes(let ranges): removes = ranges" "    case .removes: removes = []"
mutate "a delegation covering pages the client dropped or no one can vouch for" Sources/BrokerCore/Engine/BrokerEngine+Plugins.swift \
  "for excluded in [client.droppedPages[spec.id], client.lostPages[spec.id]] {" "for excluded in [OffsetRanges?.none] {"
echo "every planted bug was caught"
