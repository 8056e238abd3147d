#!/usr/bin/env bash
# End-to-end test on a kind cluster:
#   1. creates the kind cluster (or reuses one of the same name),
#   2. builds the epp and epp-model-server images (Dockerfile targets) and loads them into kind,
#   3. installs the CRDs, the model-server chart (3 CPU sim pods), the inferencepool chart (3 EPP replicas with
#      leader election, a Sheddable and a Critical InferenceModel, a sheddable InferenceObjective) and the plain
#      Envoy of manifests/envoy/,
#   4. runs tests/e2e with pytest against it.
#
# Needs: docker (daemon running), kind, the project's virtualenv (make venv); helm and kubectl come from
# hack/install-tools.sh. The cluster is deleted at the end unless it existed before or KEEP_CLUSTER=1.
#
#   hack/kind-e2e.sh                     # everything
#   KEEP_CLUSTER=1 hack/kind-e2e.sh      # keep the cluster for a look (kubectl --context kind-epp-e2e -n epp-e2e ...)
#   SKIP_BUILD=1 hack/kind-e2e.sh        # reuse the images already loaded
#   hack/kind-e2e.sh -k leader           # extra arguments go to pytest
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CLUSTER=${E2E_CLUSTER:-epp-e2e}
NS=${E2E_NS:-epp-e2e}
TAG=${E2E_TAG:-e2e}
EPP_IMAGE=epp:$TAG
MODEL_SERVER_IMAGE=epp-model-server:$TAG
ENVOY_IMAGE=${ENVOY_IMAGE:-docker.io/envoyproxy/envoy:distroless-v1.33.2}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
ARTIFACTS=${ARTIFACTS:-$ROOT/.tools/e2e-artifacts}
POOL=sim-pool                       # inferencepool release = InferencePool name; EPP = $POOL-epp
MODEL_SERVERS=sim                   # model-server release; pods labelled app=$MODEL_SERVERS-model-server
MODEL=meta-llama/Llama-3.1-8B-Instruct
SHEDDABLE_MODEL=offline-batch

log() { echo "kind-e2e: $*" >&2; }
die() { log "$*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
command -v kind >/dev/null || die "kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
[[ -x $PYTHON ]] || die "no Python at $PYTHON: run 'make venv' (or set PYTHON)"
TOOLS_BIN=$("$ROOT/hack/install-tools.sh")
export PATH="$TOOLS_BIN:$PATH"
CTX=kind-$CLUSTER
k() { kubectl --context "$CTX" -n "$NS" "$@"; }

created=
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 180s
  created=1
fi

finish() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    mkdir -p "$ARTIFACTS"
    log "failed (exit $rc): state and logs in $ARTIFACTS"
    k get all,inferencepools,inferencemodels,inferenceobjectives,leases -o wide >"$ARTIFACTS/state.txt" 2>&1 || true
    k describe pods >"$ARTIFACTS/pods.txt" 2>&1 || true
    for pod in $(k get pods -o name 2>/dev/null); do
      k logs "$pod" --all-containers --tail=2000 >"$ARTIFACTS/$(basename "$pod").log" 2>&1 || true
    done
  fi
  if [[ -n $created && -z ${KEEP_CLUSTER:-} ]]; then
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit $rc
}
trap finish EXIT

if [[ -z ${SKIP_BUILD:-} ]]; then
  log "building $EPP_IMAGE and $MODEL_SERVER_IMAGE"
  docker build --target epp -t "$EPP_IMAGE" .
  docker build --target model-server -t "$MODEL_SERVER_IMAGE" .
  docker image inspect "$ENVOY_IMAGE" >/dev/null 2>&1 || docker pull "$ENVOY_IMAGE"
  kind load docker-image --name "$CLUSTER" "$EPP_IMAGE" "$MODEL_SERVER_IMAGE" "$ENVOY_IMAGE"
fi

log "installing the CRDs"
kubectl --context "$CTX" apply --server-side -f manifests/crds/
kubectl --context "$CTX" wait --for condition=Established --timeout=60s \
  crd/inferencepools.inference.networking.k8s.io crd/inferencepools.inference.networking.x-k8s.io \
  crd/inferencemodels.inference.networking.x-k8s.io crd/inferenceobjectives.inference.networking.x-k8s.io
kubectl --context "$CTX" create namespace "$NS" --dry-run=client -o yaml | kubectl --context "$CTX" apply -f -

log "installing the model servers (3 sim pods, 2 running sequences each so that queues build up)"
helm --kube-context "$CTX" upgrade --install "$MODEL_SERVERS" charts/model-server -n "$NS" --wait --timeout 5m \
  --set engine=sim --set replicas=3 --set model="$MODEL" \
  --set image.cpu.repository=epp-model-server --set image.cpu.tag="$TAG" --set image.cpu.pullPolicy=IfNotPresent \
  --set-json "servedModelNames=[\"$MODEL\",\"$SHEDDABLE_MODEL\"]" \
  --set-json 'extraArgs=["--max-num-seqs","2"]'

log "installing the InferencePool and its EPP (3 replicas, leader election)"
helm --kube-context "$CTX" upgrade --install "$POOL" charts/inferencepool -n "$NS" \
  --set inferencePool.modelServers.matchLabels.app="$MODEL_SERVERS-model-server" \
  --set inferenceExtension.replicas=3 \
  --set inferenceExtension.image.repository=epp --set inferenceExtension.image.tag="$TAG" \
  --set inferenceExtension.flags.log-level=debug \
  --set-json 'inferenceExtension.resources={"requests":{"cpu":"100m","memory":"256Mi"},"limits":{"memory":"1Gi"}}' \
  --set-json "inferenceModels=[{\"name\":\"main\",\"modelName\":\"$MODEL\",\"criticality\":\"Critical\"},{\"name\":\"offline\",\"modelName\":\"$SHEDDABLE_MODEL\",\"criticality\":\"Sheddable\"}]" \
  --set-json 'inferenceObjectives=[{"name":"batch","priority":-1},{"name":"interactive","priority":10}]'

log "installing Envoy"
sed -e "s|docker.io/envoyproxy/envoy:distroless-v1.33.2|$ENVOY_IMAGE|" -e "s|sim-pool-epp|$POOL-epp|" \
  manifests/envoy/envoy.yaml | k apply -f -
k rollout status deployment/envoy --timeout=180s

# With leader election exactly one EPP replica is ready (the Deployment never reports all three available).
log "waiting for one ready EPP replica"
for _ in $(seq 1 90); do
  ready=$(k get pods -l "inferencepool=$POOL-epp" \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)
  [[ $ready -eq 1 ]] && break
  sleep 2
done
[[ ${ready:-0} -eq 1 ]] || die "expected exactly one ready EPP replica, found ${ready:-0}"

log "running tests/e2e"
E2E_KUBECONTEXT=$CTX E2E_NS=$NS E2E_POOL=$POOL E2E_EPP=$POOL-epp E2E_MODEL_SERVER=$MODEL_SERVERS-model-server \
E2E_MODEL=$MODEL E2E_SHEDDABLE_MODEL=$SHEDDABLE_MODEL E2E_SHEDDABLE_OBJECTIVE=batch KUBECTL=$TOOLS_BIN/kubectl \
  "$PYTHON" -m pytest -p no:cacheprovider -v tests/e2e "$@"
