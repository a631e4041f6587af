#!/usr/bin/env bash
# Installs the gRPC load generator ghz into the project (.tools/bin/ghz) with `go install`
# of a pinned release, and prints its path. Idempotent: exits 0 at once when that release
# is already there. Needs Go >= 1.18 (as `go` on PATH, or /usr/local/go/bin/go) and the Go
# module proxy; nothing else is downloaded.
#
#   bash .ci/install-ghz.sh            # → /path/to/repo/.tools/bin/ghz
#   GHZ_VERSION=v0.120.0 TOOLS_BIN=/opt/bin bash .ci/install-ghz.sh
#
# Takes about 1.5–3 min on 2 cores the first time (module download + build), 0 s after.
set -euo pipefail

GHZ_MODULE="github.com/bojand/ghz"
GHZ_VERSION="${GHZ_VERSION:-v0.120.0}"   # `go list -m -versions` lists only v0.93.0; newer tags resolve by name
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_BIN="${TOOLS_BIN:-$ROOT/.tools/bin}"
GHZ="$TOOLS_BIN/ghz"
STAMP="$TOOLS_BIN/.ghz-version"   # ghz built by `go install` reports its version as "dev"

if [ -x "$GHZ" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$GHZ_VERSION" ]; then
    echo "$GHZ"
    exit 0
fi

GO="$(command -v go || true)"
if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then
    GO=/usr/local/go/bin/go
fi
if [ -z "$GO" ]; then
    echo "install-ghz: Go is required to build ghz $GHZ_VERSION (expected 'go' on PATH or" \
         "/usr/local/go/bin/go, found neither); install Go >= 1.18 and rerun" >&2
    exit 1
fi

mkdir -p "$TOOLS_BIN"
echo "install-ghz: building $GHZ_MODULE/cmd/ghz@$GHZ_VERSION with $("$GO" version)" >&2
start=$(date +%s)
# go needs HOME (or GOCACHE and GOPATH) for its caches; a bare CI shell may lack HOME.
if [ -z "${HOME:-}" ]; then
    export GOPATH="$ROOT/.tools/go" GOCACHE="$ROOT/.tools/go-build"
fi
GOBIN="$TOOLS_BIN" GOFLAGS="${GOFLAGS:--buildvcs=false}" GOTOOLCHAIN=local \
    "$GO" install "$GHZ_MODULE/cmd/ghz@$GHZ_VERSION"
echo "$GHZ_VERSION" > "$STAMP"
echo "install-ghz: done in $(( $(date +%s) - start )) s" >&2
echo "$GHZ"
