#!/usr/bin/env bash
# Fetch the JavaScript the rendered book needs (MathJax 3, RequireJS and the
# ipywidgets HTML manager) from the npm registry into book_assets/vendor/, so that
# the built pages load nothing from the network. Idempotent: a second run only
# checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

MATHJAX=mathjax@3.2.2
REQUIREJS=requirejs@2.3.8
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
dest=book_assets/vendor
stamp="$dest/.versions"
# The suffix marks what is copied besides the packages themselves (bump it when that changes).
want="$MATHJAX $REQUIREJS $HTML_MANAGER +widget-fonts"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "npm is needed to fetch the book's JavaScript (install Node.js)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# npm pack downloads each package's tarball alone (no dependencies) and checks its integrity.
(cd "$work" && npm pack --silent "$MATHJAX" "$REQUIREJS" "$HTML_MANAGER" >/dev/null)
for tarball in "$work"/*.tgz; do
  name=$(basename "$tarball" .tgz)
  mkdir -p "$work/$name"
  tar -xzf "$tarball" -C "$work/$name"
done

new="$dest.tmp"
rm -rf "$new"
mkdir -p "$new/html-manager"
cp -r "$work"/mathjax-*/package/es5 "$new/mathjax"
cp "$work"/requirejs-*/package/require.js "$new/require.js"
cp "$work"/jupyter-widgets-html-manager-*/package/dist/embed-amd.js "$new/html-manager/embed-amd.js"
# The widget manager's icon fonts, which it loads from beside its own script.
cp "$work"/jupyter-widgets-html-manager-*/package/dist/*.{eot,svg,ttf,woff,woff2} "$new/html-manager/"
echo "$want" > "$new/.versions"
rm -rf "$dest"
mv "$new" "$dest"
echo "book assets: $want -> $dest"
