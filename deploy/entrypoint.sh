#!/bin/sh
# The image's entrypoint: `exec two-tower "$@"`, so `docker run IMAGE train --data …` runs
# `two-tower train --data …` unchanged. Two conveniences, both from the environment:
#
# 1. `serve` fills every flag it is not given from the environment (docker run IMAGE):
#      --model        $MODEL_DIR, else $ARTIFACTS_DIR/models/$MODEL_VERSION (pinned), else
#                     $ARTIFACTS_DIR/models (a store: the model the served index names)
#      --index        $INDEX_DIR, default $ARTIFACTS_DIR/indexes (a store: CURRENT, watched)
#      --host         $GRPC_HOST, default 0.0.0.0 (the CLI's own default is loopback only)
#      --port         $GRPC_PORT, default 50051
#      --metrics-port $METRICS_PORT, default 9090; set it empty for no metrics endpoint
#      --redis-url    $REDIS_URL when set, else --features $FEATURES_DIR when set
#    ARTIFACTS_DIR defaults to /artifacts.
# 2. TF_CONFIG for multi-worker training: when TF_CONFIG is unset and TRAIN_WORKER_HOSTS
#    (comma-separated host:port, one per worker, in index order) is set, TF_CONFIG is
#    composed from it and this worker's index: $TRAIN_WORKER_INDEX, else
#    $JOB_COMPLETION_INDEX (set by Kubernetes in an Indexed Job).
set -eu

fail() {
    echo "entrypoint: $*" >&2
    exit 64
}

has_flag() {  # has_flag --name ARGS…: is --name or --name=… among ARGS?
    flag=$1
    shift
    for arg in "$@"; do
        case $arg in "$flag" | "$flag"=*) return 0 ;; esac
    done
    return 1
}

compose_tf_config() {
    index=${TRAIN_WORKER_INDEX:-${JOB_COMPLETION_INDEX:-}}
    [ -n "$index" ] || fail "TRAIN_WORKER_HOSTS is set but neither TRAIN_WORKER_INDEX nor" \
        "JOB_COMPLETION_INDEX is; set one to this worker's index (0 = chief)"
    TF_CONFIG=$(python - "$TRAIN_WORKER_HOSTS" "$index" <<'PY'
import json, sys
hosts = [h.strip() for h in sys.argv[1].split(",") if h.strip()]
try:
    index = int(sys.argv[2])
except ValueError:
    sys.exit(f"entrypoint: worker index must be an integer (got {sys.argv[2]!r})")
if not 0 <= index < len(hosts):
    sys.exit(f"entrypoint: worker index must be in [0, {len(hosts)}) for "
             f"TRAIN_WORKER_HOSTS of {len(hosts)} workers (got {index})")
print(json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}))
PY
    ) || exit 64
    export TF_CONFIG
}

if [ -z "${TF_CONFIG:-}" ] && [ -n "${TRAIN_WORKER_HOSTS:-}" ]; then
    compose_tf_config
fi

if [ "${1:-}" = "serve" ]; then
    shift
    artifacts=${ARTIFACTS_DIR:-/artifacts}
    if ! has_flag --model "$@"; then
        if [ -n "${MODEL_DIR:-}" ]; then
            model=$MODEL_DIR
        elif [ -n "${MODEL_VERSION:-}" ]; then
            model=$artifacts/models/$MODEL_VERSION
        else
            model=$artifacts/models
        fi
        set -- "$@" --model "$model"
    fi
    has_flag --index "$@" || set -- "$@" --index "${INDEX_DIR:-$artifacts/indexes}"
    has_flag --host "$@" || set -- "$@" --host "${GRPC_HOST:-0.0.0.0}"
    has_flag --port "$@" || set -- "$@" --port "${GRPC_PORT:-50051}"
    if ! has_flag --metrics-port "$@" && [ -n "${METRICS_PORT-9090}" ]; then
        set -- "$@" --metrics-port "${METRICS_PORT-9090}"
    fi
    if ! has_flag --redis-url "$@" && ! has_flag --features "$@"; then
        if [ -n "${REDIS_URL:-}" ]; then
            set -- "$@" --redis-url "$REDIS_URL"
        elif [ -n "${FEATURES_DIR:-}" ]; then
            set -- "$@" --features "$FEATURES_DIR"
        fi
    fi
    set -- serve "$@"
fi

exec two-tower "$@"
