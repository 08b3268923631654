#!/usr/bin/env bash
# Vendors noVNC (the browser VNC client of `capsa screen view`) from the npm
# registry into crates/capsa-api/assets/novnc/, checking the tarball against
# a pinned integrity hash. Run by hand to upgrade (change VERSION and
# INTEGRITY together); builds and tests never need npm: the output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.7.0
INTEGRITY='sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA=='
DEST=crates/capsa-api/assets/novnc

command -v npm >/dev/null || { echo "vendor-novnc: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && npm pack --silent "@novnc/novnc@$VERSION" >/dev/null )
tgz="$tmp/novnc-novnc-$VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
  echo "vendor-novnc: integrity mismatch for @novnc/novnc@$VERSION: got $got, pinned $INTEGRITY" >&2
  exit 1
fi
tar xzf "$tgz" -C "$tmp"
rm -rf "$DEST"
mkdir -p "$DEST"
# The RFB client (core/) and the zlib it imports (vendor/pako/lib); the
# licences of everything shipped.
cp -r "$tmp/package/core" "$DEST/core"
mkdir -p "$DEST/vendor/pako"
cp -r "$tmp/package/vendor/pako/lib" "$DEST/vendor/pako/lib"
cp "$tmp/package/vendor/pako/LICENSE" "$DEST/vendor/pako/LICENSE"
cp "$tmp/package/LICENSE.txt" "$tmp/package/AUTHORS" "$DEST/"
mkdir -p "$DEST/docs"
cp "$tmp/package/docs/LICENSE.MPL-2.0" "$tmp/package/docs/LICENSE.BSD-2-Clause" "$tmp/package/docs/LICENSE.BSD-3-Clause" "$DEST/docs/"
cat > "$DEST/README.md" <<README
# noVNC $VERSION (vendored)

The browser VNC client behind \`capsa screen view\` and capsad's
\`/v1/sandboxes/{name}/screen/view\`, embedded into the binaries by
\`crates/capsa-api/src/viewer.rs\` and served as-is.

- Source: the npm package \`@novnc/novnc@$VERSION\` (https://github.com/novnc/noVNC)
- Tarball integrity (npm \`dist.integrity\`, checked by \`scripts/vendor-novnc.sh\`):
  \`$INTEGRITY\`
- Licence: MPL-2.0 for noVNC's core (\`LICENSE.txt\`, \`docs/LICENSE.MPL-2.0\`);
  pako (\`vendor/pako\`) is MIT (\`vendor/pako/LICENSE\`); some core files are
  BSD (\`docs/LICENSE.BSD-*\`).
- Kept: \`core/\`, \`vendor/pako/lib/\` and the licence files, unmodified.

Regenerate (needs npm): \`scripts/vendor-novnc.sh\` (pin a new version by
changing \`VERSION\` and \`INTEGRITY\` there).
README
echo "vendored @novnc/novnc@$VERSION into $DEST"
