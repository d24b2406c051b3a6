#!/usr/bin/env bash
# The local control plane: etcd + kube-apiserver 1.20 (built from Debian's source by
# build-apiserver.sh) as host processes on 127.0.0.1. There is no kubelet, scheduler
# or controller-manager here: Pods never run, and nothing garbage-collects ownerReferences
# or finishes namespace deletion, until e2e/env/node.sh adds a real node. `make cluster-up` runs
# both (this, then node.sh up: the full single-node cluster); this script alone is the bare
# API server `make cluster-bare` starts for the API and chart tests.
# The API server does not write the `kubernetes` Endpoints itself (its address, 127.0.0.1,
# is not valid there); node.sh writes them with an address Pods can reach.
#
#   bash e2e/env/cluster.sh up             start (idempotent; a no-op when already healthy)
#   bash e2e/env/cluster.sh down [--purge] stop what `up` started; --purge also drops data,
#                                      certificates, tokens and kubeconfigs
#   bash e2e/env/cluster.sh status         what runs (exit 0 when the API server is ready, 3 if not)
#   bash e2e/env/cluster.sh env            prints `export KUBECONFIG=...`
#
# Everything lives under <repo>/.run/cluster/:
#   kubeconfig                admin (group system:masters)
#   kubeconfig-operator       user bpfpoly-operator    (no groups: RBAC must grant it)
#   kubeconfig-agent-local    user bpfpoly-agent-local (no groups: RBAC must grant it)
#   tokens.csv, pki/sa.{key,pub}, pki/ca.{key,crt} (local CA), certs/ (serving cert for
#   127.0.0.1 and 10.0.2.100, the microVMs' guestfwd address), etcd/ (data), *.log, *.pid
# Ports (override with the variables): etcd client 23790 (BPFPOLY_ETCD_PORT),
# etcd peer 23800 (BPFPOLY_ETCD_PEER_PORT), API server 16443 (BPFPOLY_APISERVER_PORT).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RUN="$REPO/.run/cluster"
CACHE="${BPFPOLY_CACHE:-$HOME/.cache/bpfpoly}"
APISERVER_BIN="$CACHE/bin/kube-apiserver"
ETCD_PORT="${BPFPOLY_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${BPFPOLY_ETCD_PEER_PORT:-23800}"
API_PORT="${BPFPOLY_APISERVER_PORT:-16443}"
API_URL="https://127.0.0.1:$API_PORT"
ETCD_URL="http://127.0.0.1:$ETCD_PORT"
KUBECONFIG_ADMIN="$RUN/kubeconfig"
READY_TIMEOUT="${BPFPOLY_READY_TIMEOUT:-60}"
# Non-admin identities the project's components run as (token users; no groups).
EXTRA_USERS=(bpfpoly-operator bpfpoly-agent-local)

log() { echo "[bpfpoly] $*" >&2; }
die() { echo "[bpfpoly] ERROR: $*" >&2; exit 1; }

# --- processes ------------------------------------------------------------------------

# The PID in $RUN/<name>.pid if that process is alive and is the one we started
# (its command line names the binary and our run directory); empty otherwise.
our_pid() {
    local name=$1 pid cmdline
    [[ -s $RUN/$name.pid ]] || return 0
    pid="$(<"$RUN/$name.pid")"
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 0
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    # Read in the middle of the exec (the starter shell becoming the daemon), cmdline can
    # be empty for an instant: read it once more before deciding it is not ours.
    if [[ -z $cmdline ]]; then
        sleep 0.1
        cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    fi
    [[ $cmdline == *"$name"* && $cmdline == *"$RUN"* ]] && echo "$pid"
    return 0
}

# Starts "$@" in its own session, detached from this script (it outlives it), output
# to $RUN/<name>.log. The PID file is written by the process itself just before it
# execs, so it is right however setsid forks.
start_daemon() {
    local name=$1
    shift
    rm -f "$RUN/$name.pid"
    echo "===== $(date -Is) $*" >>"$RUN/$name.log"
    # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN/$name.pid" "$@" >>"$RUN/$name.log" 2>&1 </dev/null &
    local i
    for i in $(seq 50); do
        [[ -s $RUN/$name.pid ]] && return 0
        sleep 0.1
    done
    die "$name did not start (see $RUN/$name.log)"
}

stop_daemon() {
    local name=$1 pid i
    if [[ ! -e $RUN/$name.pid ]]; then
        log "$name: not running"
        return 0
    fi
    pid="$(our_pid "$name")"
    if [[ -z $pid ]]; then
        log "$name: stale pid file (process $(<"$RUN/$name.pid") is gone or is not ours); removing it"
        rm -f "$RUN/$name.pid"
        return 0
    fi
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 300); do
        alive "$pid" || break
        [[ $i -eq 200 ]] && { log "$name: still running after 20 s; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
        sleep 0.1
    done
    alive "$pid" && die "$name (pid $pid) did not exit"
    rm -f "$RUN/$name.pid"
}

# Alive and not a zombie (an exited child not yet reaped still has a /proc entry).
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ ${stat%% *} != Z ]]
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

show_log_tail() {
    echo "----- last 30 lines of $RUN/$1.log -----" >&2
    tail -n 30 "$RUN/$1.log" >&2 || true
}

admin_token() { awk -F, '$2 == "admin" {print $1; exit}' "$RUN/tokens.csv" 2>/dev/null; }

api_ready() {
    local token
    token="$(admin_token)"
    [[ -n $token ]] || return 1
    [[ "$(curl -sk --max-time 2 -H "Authorization: Bearer $token" "$API_URL/readyz" 2>/dev/null)" == ok ]]
}

etcd_healthy() { curl -s --max-time 2 "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"'; }

# --- configuration files (made once, kept across restarts) -----------------------------

ensure_credentials() {
    mkdir -p "$RUN/pki" "$RUN/certs" "$RUN/etcd"
    chmod 700 "$RUN/pki" "$RUN/etcd"
    if [[ ! -s $RUN/pki/sa.key || ! -s $RUN/pki/sa.pub ]]; then
        log "generating the service-account signing key"
        openssl genrsa -out "$RUN/pki/sa.key" 2048 2>/dev/null
        openssl rsa -in "$RUN/pki/sa.key" -pubout -out "$RUN/pki/sa.pub" 2>/dev/null
        chmod 600 "$RUN/pki/sa.key"
    fi
    if [[ ! -s $RUN/tokens.csv ]]; then
        log "writing token file (admin, ${EXTRA_USERS[*]})"
        umask 077
        {
            echo "$(openssl rand -hex 24),admin,admin,\"system:masters\""
            local user
            for user in "${EXTRA_USERS[@]}"; do
                echo "$(openssl rand -hex 24),$user,$user"
            done
        } >"$RUN/tokens.csv.tmp"
        umask 022
        mv -f "$RUN/tokens.csv.tmp" "$RUN/tokens.csv"
    fi
}

# The API server's serving certificate, signed by a local CA (pki/ca.{key,crt}). It covers
# 127.0.0.1 (host processes) and 10.0.2.100, the address at which the microVMs' guestfwd
# (e2e/kernels/vm.sh) forwards to this port: agents in real-kernel guests verify it too.
# Made once and kept; remade when it expires within a day or lacks one of the addresses.
SERVING_SANS="IP:127.0.0.1,IP:10.0.2.100,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
ensure_serving_cert() {
    local crt=$RUN/certs/apiserver.crt key=$RUN/certs/apiserver.key
    if [[ ! -s $RUN/pki/ca.crt || ! -s $RUN/pki/ca.key ]] || ! openssl x509 -checkend 86400 -noout -in "$RUN/pki/ca.crt" >/dev/null 2>&1; then
        log "generating the local CA for the API server's serving certificate"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout "$RUN/pki/ca.key" -out "$RUN/pki/ca.crt" \
            -days 365 -subj "/CN=bpfpoly-local-ca" 2>/dev/null
        chmod 600 "$RUN/pki/ca.key"
        rm -f "$crt" "$key"
    fi
    if [[ -s $crt && -s $key ]] && openssl x509 -checkend 86400 -noout -in "$crt" >/dev/null 2>&1 \
        && openssl verify -CAfile "$RUN/pki/ca.crt" "$crt" >/dev/null 2>&1 \
        && openssl x509 -noout -ext subjectAltName -in "$crt" 2>/dev/null | grep -q "IP Address:10.0.2.100"; then
        return 0
    fi
    log "generating the API server's serving certificate ($SERVING_SANS)"
    openssl req -newkey rsa:2048 -nodes -keyout "$key" -out "$RUN/certs/apiserver.csr" \
        -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in "$RUN/certs/apiserver.csr" -CA "$RUN/pki/ca.crt" -CAkey "$RUN/pki/ca.key" \
        -CAcreateserial -out "$crt" -days 365 \
        -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$SERVING_SANS") 2>/dev/null \
        || die "openssl could not sign the serving certificate"
    chmod 600 "$key"
    rm -f "$RUN/certs/apiserver.csr"
}

# kubeconfig for one token user. The CA is the local CA that signed the API server's
# serving certificate: real TLS verification, for kubectl and for kube-rs with rustls alike.
write_kubeconfig() {
    local user=$1 file=$2 token ca
    token="$(awk -F, -v u="$user" '$2 == u {print $1; exit}' "$RUN/tokens.csv")"
    [[ -n $token ]] || die "no token for $user in $RUN/tokens.csv"
    [[ -s $RUN/pki/ca.crt ]] || die "$RUN/pki/ca.crt missing"
    ca="$(base64 -w0 <"$RUN/pki/ca.crt")"
    umask 077
    cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bpfpoly-local
  cluster:
    server: $API_URL
    certificate-authority-data: $ca
users:
- name: $user
  user:
    token: $token
contexts:
- name: $user@bpfpoly-local
  context:
    cluster: bpfpoly-local
    user: $user
current-context: $user@bpfpoly-local
EOF
    umask 022
    mv -f "$file.tmp" "$file"
}

write_kubeconfigs() {
    write_kubeconfig admin "$KUBECONFIG_ADMIN"
    local user
    for user in "${EXTRA_USERS[@]}"; do
        write_kubeconfig "$user" "$RUN/kubeconfig-${user#bpfpoly-}"
    done
}

print_env() {
    log "kubeconfig: $KUBECONFIG_ADMIN (also kubeconfig-operator, kubeconfig-agent-local)"
    echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

# --- commands ---------------------------------------------------------------------------

start_etcd() {
    if [[ -n $(our_pid etcd) ]]; then
        return 0
    fi
    rm -f "$RUN/etcd.pid"
    port_busy "$ETCD_PORT" && die "port $ETCD_PORT (etcd client) is taken by another process; set BPFPOLY_ETCD_PORT"
    port_busy "$ETCD_PEER_PORT" && die "port $ETCD_PEER_PORT (etcd peer) is taken by another process; set BPFPOLY_ETCD_PEER_PORT"
    log "etcd: starting on $ETCD_URL (data $RUN/etcd)"
    start_daemon etcd etcd \
        --name bpfpoly \
        --data-dir "$RUN/etcd" \
        --listen-client-urls "$ETCD_URL" \
        --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "bpfpoly=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state new \
        --logger zap --log-outputs stderr
}

wait_etcd() {
    local i pid
    for i in $(seq 100); do
        etcd_healthy && return 0
        pid="$(our_pid etcd)"
        if [[ -z $pid ]]; then
            sleep 0.5
            pid="$(our_pid etcd)"
        fi
        [[ -n $pid ]] || { show_log_tail etcd; die "etcd exited during start (no live etcd with PID file $RUN/etcd.pid)"; }
        sleep 0.2
    done
    show_log_tail etcd
    die "etcd not healthy after 20 s"
}

start_apiserver() {
    if [[ -n $(our_pid kube-apiserver) ]]; then
        return 0
    fi
    rm -f "$RUN/kube-apiserver.pid"
    ensure_serving_cert # kubeconfigs are rewritten after the start
    port_busy "$API_PORT" && die "port $API_PORT (kube-apiserver) is taken by another process; set BPFPOLY_APISERVER_PORT"
    log "kube-apiserver: starting on $API_URL"
    start_daemon kube-apiserver "$APISERVER_BIN" \
        --etcd-servers "$ETCD_URL" \
        --bind-address 127.0.0.1 \
        --advertise-address 127.0.0.1 \
        --secure-port "$API_PORT" \
        --insecure-port 0 \
        --cert-dir "$RUN/certs" \
        --tls-cert-file "$RUN/certs/apiserver.crt" \
        --tls-private-key-file "$RUN/certs/apiserver.key" \
        --token-auth-file "$RUN/tokens.csv" \
        --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$RUN/pki/sa.pub" \
        --service-account-signing-key-file "$RUN/pki/sa.key" \
        --service-cluster-ip-range 10.0.0.0/24 \
        --allow-privileged=true \
        --endpoint-reconciler-type none \
        --kubelet-preferred-address-types InternalIP \
        --profiling=false
}

wait_apiserver() {
    local t0=$SECONDS
    printf '[bpfpoly] kube-apiserver: waiting for /readyz ' >&2
    while ((SECONDS - t0 < READY_TIMEOUT)); do
        if api_ready; then
            echo " ready ($((SECONDS - t0)) s)" >&2
            return 0
        fi
        if [[ -z $(our_pid kube-apiserver) ]]; then
            echo " exited" >&2
            show_log_tail kube-apiserver
            die "kube-apiserver exited during start"
        fi
        printf '.' >&2
        sleep 1
    done
    echo " timeout" >&2
    show_log_tail kube-apiserver
    die "kube-apiserver not ready after $READY_TIMEOUT s (log: $RUN/kube-apiserver.log); it is left running: \`bash e2e/env/cluster.sh down\` stops it"
}

cmd_up() {
    mkdir -p "$RUN"
    if [[ -n $(our_pid etcd) && -n $(our_pid kube-apiserver) ]] && api_ready; then
        [[ -s $KUBECONFIG_ADMIN ]] || write_kubeconfigs
        log "cluster already running and ready at $API_URL"
        print_env
        return 0
    fi
    local t0=$SECONDS
    bash "$HERE/install-deps.sh" --apt etcd-server openssl curl
    bash "$HERE/build-apiserver.sh"
    # All ports checked before anything starts, so a clash leaves nothing half-up.
    if [[ -z $(our_pid etcd) ]]; then
        port_busy "$ETCD_PORT" && die "port $ETCD_PORT (etcd client) is taken by another process; set BPFPOLY_ETCD_PORT"
        port_busy "$ETCD_PEER_PORT" && die "port $ETCD_PEER_PORT (etcd peer) is taken by another process; set BPFPOLY_ETCD_PEER_PORT"
    fi
    if [[ -z $(our_pid kube-apiserver) ]]; then
        port_busy "$API_PORT" && die "port $API_PORT (kube-apiserver) is taken by another process; set BPFPOLY_APISERVER_PORT"
    fi
    ensure_credentials
    start_etcd
    wait_etcd
    start_apiserver
    wait_apiserver
    write_kubeconfigs
    log "cluster up in $((SECONDS - t0)) s: $API_URL ($("$APISERVER_BIN" --version))"
    print_env
}

cmd_down() {
    local purge=0
    case "${1:-}" in
        "") ;;
        --purge) purge=1 ;;
        *) die "usage: $0 down [--purge]" ;;
    esac
    # The API server first, so it never runs without its etcd.
    stop_daemon kube-apiserver
    stop_daemon etcd
    if [[ $purge -eq 1 && -d $RUN ]]; then
        log "purging $RUN"
        rm -rf -- "$RUN"
    fi
    log "cluster down"
}

cmd_status() {
    local pid rc=3
    pid="$(our_pid etcd)"
    if [[ -n $pid ]]; then
        log "etcd: running (pid $pid) on $ETCD_URL, $(etcd_healthy && echo healthy || echo NOT healthy)"
    else
        log "etcd: not running"
    fi
    pid="$(our_pid kube-apiserver)"
    if [[ -n $pid ]]; then
        if api_ready; then
            log "kube-apiserver: running (pid $pid) on $API_URL, ready"
            rc=0
        else
            log "kube-apiserver: running (pid $pid) on $API_URL, NOT ready"
        fi
    else
        log "kube-apiserver: not running"
    fi
    [[ -s $KUBECONFIG_ADMIN ]] && log "kubeconfig: $KUBECONFIG_ADMIN"
    return $rc
}

case "${1:-}" in
    up) shift; [[ $# -eq 0 ]] || die "usage: $0 up"; cmd_up ;;
    down) shift; cmd_down "$@" ;;
    status) cmd_status ;;
    env) echo "export KUBECONFIG=$KUBECONFIG_ADMIN" ;;
    *) die "usage: $0 up | down [--purge] | status | env" ;;
esac
