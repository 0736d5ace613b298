#!/usr/bin/env bash
# real-docker.sh: end-to-end test of docker-socket-router against real rootless Docker daemons.
#
# Usage: tests/e2e/real-docker.sh [--direct] [path-to-router-binary]
#
#   path-to-router-binary  default: target/release/docker-socket-router (built with
#                          `cargo build --release` when missing)
#   --direct               (or DSR_E2E_DIRECT=1) do not start the router: run the scenarios
#                          against each user's daemon socket directly. For debugging the
#                          harness itself; router-only scenarios are skipped.
#
# Run as root on a Debian 12 machine (tests/e2e/setup-host.sh, called first, prepares it).
# It starts a rootless dockerd for dsr-alice and dsr-bob (dsr-carol never gets one), builds a
# tiny local image in each, starts the router on a temporary socket (never
# /var/run/docker.sock) and runs every scenario as those users with the real docker CLI.
#
# Output: one line per scenario, `PASS name` or `FAIL name: reason`, then a final line
# `N passed, M failed`. Diagnostics (timings, router log tails) go to stderr. Exit status is
# non-zero when any scenario failed or the harness could not start.
#
# Everything this script starts (daemons, router, background clients) is stopped on every exit
# path, by pid; its temporary directory is removed. The test users are left in place.
#
# Environment (all optional):
#   DSR_E2E_DOCKER      docker CLI for the scenarios (default /usr/bin/docker, Debian's 20.10,
#                       which has BuildKit built in)
#   DSR_E2E_DOCKER_ALT  second client for a few extra scenarios (default /usr/local/bin/docker
#                       when present and different); set to "" to skip them
#   DSR_E2E_KEEP=1      keep the temporary directory (logs) after the run
#   DSR_E2E_ROUTER_ARGS extra arguments for the router
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
DIRECT=${DSR_E2E_DIRECT:-0}
ROUTER=""
for arg in "$@"; do
    case $arg in
        --direct) DIRECT=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "unknown option: $arg" >&2
            exit 2
            ;;
        *) ROUTER=$arg ;;
    esac
done
ROUTER=${ROUTER:-$REPO/target/release/docker-socket-router}

ALICE=dsr-alice
BOB=dsr-bob
CAROL=dsr-carol # never gets a daemon
DOCKER=${DSR_E2E_DOCKER:-/usr/bin/docker}
DOCKER_ALT=${DSR_E2E_DOCKER_ALT-/usr/local/bin/docker}
IMAGE=busybox:local
LABEL=dsr-e2e # every container this script creates carries this label
PATH_FOR_USERS=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin
DAEMON_START_TIMEOUT=60 # seconds to wait for a rootless dockerd to answer
CMD_TIMEOUT=120         # default bound for any single docker command
MiB=$((1024 * 1024))

RUN_ID="$$-$(date +%s)" # makes names unique per run
T_START=$SECONDS

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
note() { printf '# %s\n' "$*" >&2; }
die() {
    printf 'real-docker: error: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it starts daemons as the test users)"

uid_of() { id -u "$1"; }
home_of() { getent passwd "$1" | cut -d: -f6; }
daemon_sock() { echo "/run/user/$(uid_of "$1")/docker.sock"; }

# The socket a user's docker CLI talks to in the scenarios: the router's, or (with --direct)
# the user's own daemon socket.
scenario_sock() {
    if ((DIRECT)); then daemon_sock "$1"; else echo "$ROUTER_SOCK"; fi
}

# Fill the global array PFX with the command prefix that runs something as USER with a clean
# environment talking to SOCK, bounded by SECS seconds (then SIGTERM, SIGKILL 5 s later).
# Extra NAME=VALUE pairs are added to the environment. An array (rather than a function) so
# that `"${PFX[@]}" cmd &` makes $! the pid of `timeout` itself, which can then be killed.
prefix_for() {
    local user=$1 sock=$2 secs=$3
    shift 3
    PFX=(timeout -k 5 "$secs" runuser -u "$user" -- env -i
        "PATH=$PATH_FOR_USERS" "HOME=$(home_of "$user")" "USER=$user" "LOGNAME=$user"
        LANG=C.UTF-8 "DOCKER_HOST=unix://$sock" "$@")
}

# dk USER ARGS...: run `$DOCKER ARGS...` as USER through the scenario socket.
# DK_TIMEOUT (default CMD_TIMEOUT) bounds it; DK_ENV adds environment variables;
# DK_BIN overrides the client binary.
dk() {
    local user=$1
    shift
    local -a extra_env=()
    if [[ -n ${DK_ENV:-} ]]; then read -r -a extra_env <<<"$DK_ENV"; fi
    prefix_for "$user" "$(scenario_sock "$user")" "${DK_TIMEOUT:-$CMD_TIMEOUT}" "${extra_env[@]}"
    "${PFX[@]}" "${DK_BIN:-$DOCKER}" "$@"
}

# dd_ USER ARGS...: same, but always straight to the user's own daemon socket (setup,
# reference values, cleanup), never through the router.
dd_() {
    local user=$1
    shift
    prefix_for "$user" "$(daemon_sock "$user")" "${DK_TIMEOUT:-$CMD_TIMEOUT}"
    "${PFX[@]}" "$DOCKER" "$@"
}

# Milliseconds since the epoch.
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Create a file of N MiB of random bytes, readable by everyone (the users read it).
random_file() {
    head -c "$(($2 * MiB))" /dev/urandom >"$1"
    chmod 0644 "$1"
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------------------------------------
# Cleanup: runs on every exit path
# ---------------------------------------------------------------------------------------------
TMP=""
ROUTER_PID=""
declare -A DAEMON_LEADER=() # user -> pid of the detached `runuser` that leads the daemon
declare -A DAEMON_USERNS=() # user -> user namespace of that daemon (dockerd, containerd, shims)
BG_PIDS=()                  # background clients (docker events, ...)

# Every pid whose user namespace is NS: the rootless dockerd, containerd, shims and the
# container processes all live in the namespace rootlesskit created for this daemon.
pids_in_userns() {
    local ns=$1 p
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/user" 2>/dev/null) == "$ns" ]] && echo "${p#/proc/}"
    done
    return 0
}

# Every pid in process group PGID.
pids_in_pgid() {
    ps -eo pid=,pgid= | awk -v g="$1" '$2 == g { print $1 }'
}

# Wait until none of the given pids exists, up to SECS seconds. Returns 1 on timeout.
wait_gone() {
    local secs=$1
    shift
    local deadline=$((SECONDS + secs)) p alive
    while :; do
        alive=0
        for p in "$@"; do
            if kill -0 "$p" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

stop_daemon() {
    local user=$1 leader=${DAEMON_LEADER[$1]:-}
    [[ -n $leader ]] || return 0
    # Remove this run's leftover containers so no shim outlives the daemon.
    local ids
    ids=$(DK_TIMEOUT=20 dd_ "$user" ps -aq --filter "label=$LABEL" 2>/dev/null || true)
    if [[ -n $ids ]]; then
        # shellcheck disable=SC2086 # one id per word
        DK_TIMEOUT=30 dd_ "$user" rm -f $ids >/dev/null 2>&1 || true
    fi
    # Collect the whole daemon (process group + its user namespace) before signalling: once
    # dockerd exits, its children are re-parented and could not be found by ancestry.
    local -a pids
    mapfile -t pids < <({
        pids_in_pgid "$leader"
        [[ -n ${DAEMON_USERNS[$user]:-} ]] && pids_in_userns "${DAEMON_USERNS[$user]}"
    } | sort -u)
    # rootlesskit passes SIGTERM on to dockerd, which shuts containerd down cleanly.
    kill -TERM -- "-$leader" 2>/dev/null || true
    if ! wait_gone 20 "${pids[@]}"; then
        note "daemon of $user did not stop in 20 s; killing it"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 5 "${pids[@]}" || true
    fi
    unset "DAEMON_LEADER[$user]"
}

stop_router() {
    [[ -n $ROUTER_PID ]] || return 0
    kill -TERM "$ROUTER_PID" 2>/dev/null || true
    if ! wait_gone 15 "$ROUTER_PID"; then
        note "router did not exit 15 s after SIGTERM; killing it"
        kill -KILL "$ROUTER_PID" 2>/dev/null || true
    fi
    wait "$ROUTER_PID" 2>/dev/null || true
    ROUTER_PID=""
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    local p
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    stop_router
    local u
    for u in "${!DAEMON_LEADER[@]}"; do stop_daemon "$u"; done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ ${DSR_E2E_KEEP:-0} == 1 ]]; then
            note "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------------------------
# Host, daemons, image, router
# ---------------------------------------------------------------------------------------------
"$HERE/setup-host.sh"

[[ -x $DOCKER ]] || die "docker CLI $DOCKER not found"
if [[ -n $DOCKER_ALT ]]; then
    # Only worth a second pass when it is a different client.
    if [[ ! -x $DOCKER_ALT ]] || [[ $(readlink -f "$DOCKER_ALT") == $(readlink -f "$DOCKER") ]]; then
        DOCKER_ALT=""
    fi
fi

TMP=$(mktemp -d /tmp/dsr-e2e.XXXXXX)
chmod 0755 "$TMP" # the users must reach the router socket and the input files
mkdir -p "$TMP/logs"
# One writable scratch directory per user for files their docker CLI writes itself.
for u in $ALICE $BOB $CAROL; do
    install -d -m 0700 -o "$u" -g "$(id -g "$u")" "$TMP/out-$u"
done

# Remove pid FILE unless it names a live (non-zombie) process called COMM.
clear_stale_pidfile() {
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] &&
        [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
        return 0
    fi
    note "removing stale $file (pid ${pid:-?} is not a running $comm)"
    rm -f "$file"
}

# Start USER's rootless dockerd, detached in its own session, unless one already answers
# (then it is used but not stopped at the end: this script did not start it).
start_daemon() {
    local user=$1 uid home sock
    uid=$(uid_of "$user")
    home=$(home_of "$user")
    sock=$(daemon_sock "$user")
    if DK_TIMEOUT=10 dd_ "$user" version >/dev/null 2>&1; then
        note "a daemon already answers on $sock; using it (it will not be stopped)"
        return 0
    fi
    # A daemon killed hard on an earlier run leaves pid files behind; while such a pid is still
    # a zombie (or was reused), dockerd refuses to start, or waits for a containerd that is
    # gone. Nothing answers on the socket (checked above), so they are stale.
    clear_stale_pidfile "/run/user/$uid/docker.pid" dockerd
    clear_stale_pidfile "/run/user/$uid/docker/containerd/containerd.pid" containerd
    note "starting rootless dockerd for $user (uid $uid)"
    setsid runuser -u "$user" -- env -i "PATH=$PATH_FOR_USERS" "HOME=$home" \
        "USER=$user" "LOGNAME=$user" "XDG_RUNTIME_DIR=/run/user/$uid" \
        dockerd-rootless.sh --iptables=false --bridge=none \
        </dev/null >"$TMP/logs/dockerd-$user.log" 2>&1 &
    DAEMON_LEADER[$user]=$!
}

# Wait until USER's daemon answers, then remember its user namespace (for cleanup).
# On failure prints the daemon's log tail and returns 1.
wait_daemon() {
    local user=$1 deadline=$((SECONDS + DAEMON_START_TIMEOUT)) leader
    until DK_TIMEOUT=10 dd_ "$user" version >/dev/null 2>&1; do
        leader=${DAEMON_LEADER[$user]:-}
        if ((SECONDS >= deadline)) || { [[ -n $leader ]] && ! kill -0 "$leader" 2>/dev/null; }; then
            tail -n 30 "$TMP/logs/dockerd-$user.log" | sed 's/^/    dockerd: /' >&2 || true
            note "rootless dockerd of $user did not come up (see its log above)"
            return 1
        fi
        sleep 0.5
    done
    leader=${DAEMON_LEADER[$user]:-}
    [[ -n $leader ]] || return 0
    local host_ns p ns
    host_ns=$(readlink /proc/self/ns/user)
    for p in $(pids_in_pgid "$leader"); do
        ns=$(readlink "/proc/$p/ns/user" 2>/dev/null || true)
        if [[ -n $ns && $ns != "$host_ns" ]]; then
            DAEMON_USERNS[$user]=$ns
            break
        fi
    done
}

# Remove what an earlier, hard-killed run may have left in USER's daemon: containers carrying
# $LABEL and images tagged dsr-*.
purge_leftovers() {
    local user=$1 ids
    ids=$(DK_TIMEOUT=30 dd_ "$user" ps -aq --filter "label=$LABEL" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one id per word
    [[ -z $ids ]] || DK_TIMEOUT=60 dd_ "$user" rm -f $ids >/dev/null 2>&1 || true
    ids=$(DK_TIMEOUT=30 dd_ "$user" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep '^dsr-' || true)
    # shellcheck disable=SC2086 # one name per word
    [[ -z $ids ]] || DK_TIMEOUT=60 dd_ "$user" rmi -f $ids >/dev/null 2>&1 || true
}

# A root filesystem with a static busybox and a symlink per applet, imported as $IMAGE.
make_rootfs_tar() {
    local root=$TMP/rootfs a
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do
        [[ $a == busybox ]] || ln -sf busybox "$root/bin/$a"
    done
    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$TMP/rootfs.tar" .
    chmod 0644 "$TMP/rootfs.tar"
}

import_image() {
    local user=$1
    DK_TIMEOUT=60 dd_ "$user" import - "$IMAGE" <"$TMP/rootfs.tar" >/dev/null ||
        die "docker import for $user failed"
}

ROUTER_SOCK=$TMP/docker.sock
ROUTER_LOG=$TMP/logs/router.log

# Make sure the router binary exists, building the default one when missing.
ensure_router_binary() {
    if [[ ! -x $ROUTER && $ROUTER == "$REPO/target/release/docker-socket-router" ]]; then
        note "building the router (cargo build --release)"
        (cd "$REPO" && cargo build --release) >&2 || die "cargo build --release failed"
    fi
    [[ -x $ROUTER ]] || die "router binary $ROUTER not found"
}

start_router() {
    local -a extra=()
    if [[ -n ${DSR_E2E_ROUTER_ARGS:-} ]]; then read -r -a extra <<<"$DSR_E2E_ROUTER_ARGS"; fi
    note "starting router $ROUTER on $ROUTER_SOCK"
    "$ROUTER" --socket "$ROUTER_SOCK" --log-target stderr --verbose "${extra[@]}" \
        </dev/null >"$TMP/logs/router.stdout" 2>"$ROUTER_LOG" &
    ROUTER_PID=$!
    local deadline=$((SECONDS + 10))
    until [[ -S $ROUTER_SOCK ]]; do
        if ! kill -0 "$ROUTER_PID" 2>/dev/null; then
            tail -n 30 "$ROUTER_LOG" | sed 's/^/    router: /' >&2 || true
            die "router exited during start-up"
        fi
        ((SECONDS < deadline)) || die "router socket $ROUTER_SOCK did not appear within 10 s"
        sleep 0.1
    done
}

# Size of the router log now, so a failure can show what the router logged meanwhile.
router_log_size() {
    if ((DIRECT)) || [[ ! -f $ROUTER_LOG ]]; then echo 0; else stat -c %s "$ROUTER_LOG"; fi
}

# router_tail FROM: the last 40 lines the router logged since byte offset FROM.
router_tail() {
    ((DIRECT)) && return 0
    [[ -f $ROUTER_LOG ]] || return 0
    note "router log since the scenario started (last 40 lines):"
    tail -c "+$(($1 + 1))" "$ROUTER_LOG" | tail -n 40 | sed 's/^/    router: /' >&2 || true
}

# ---------------------------------------------------------------------------------------------
# Scenario runner
# ---------------------------------------------------------------------------------------------
PASSED=0
FAILED=0
SKIPPED=0
REASON_FILE="" # set once TMP exists

# fail REASON: record why the current scenario failed; returns 1 so `|| { fail ..; return; }`
# ends the scenario with a failure.
fail() {
    printf '%s' "$*" >"$REASON_FILE"
    return 1
}

# skip REASON: record that the scenario does not apply; returns 2.
skip() {
    printf '%s' "$*" >"$REASON_FILE"
    return 2
}

# First line of a file, for error messages (empty when missing).
first_line() { head -n 1 "$1" 2>/dev/null | cut -c1-300 || true; }

# scenario NAME FUNCTION: run one scenario and print its result line.
scenario() {
    local name=$1 fn=$2 t0 rc=0 log_from
    : >"$REASON_FILE"
    log_from=$(router_log_size)
    t0=$(now_ms)
    "$fn" || rc=$?
    local took=$(($(now_ms) - t0))
    case $rc in
        0)
            echo "PASS $name"
            PASSED=$((PASSED + 1))
            ;;
        2)
            echo "SKIP $name: $(cat "$REASON_FILE")"
            SKIPPED=$((SKIPPED + 1))
            ;;
        *)
            local reason
            reason=$(cat "$REASON_FILE")
            echo "FAIL $name: ${reason:-exit status $rc}"
            FAILED=$((FAILED + 1))
            router_tail "$log_from"
            ;;
    esac
    note "$name took ${took} ms"
}

# ---------------------------------------------------------------------------------------------
# Scenarios. Each returns 0 (pass), 1 (fail, reason via `fail`) or 2 (skip).
# Files under $TMP/s-<name> are scratch space.
# ---------------------------------------------------------------------------------------------

# 1. `docker info` through the router reaches the caller's own daemon.
s_info_own_daemon() {
    local d=$TMP/s-info want_a want_b got_a got_b
    mkdir -p "$d"
    local fmt='{{.ID}} {{.DockerRootDir}}'
    want_a=$(dd_ $ALICE info --format "$fmt" 2>"$d/err") || { fail "direct info (alice): $(first_line "$d/err")"; return; }
    want_b=$(dd_ $BOB info --format "$fmt" 2>"$d/err") || { fail "direct info (bob): $(first_line "$d/err")"; return; }
    got_a=$(dk $ALICE info --format "$fmt" 2>"$d/err") || { fail "alice: docker info exited non-zero: $(first_line "$d/err")"; return; }
    got_b=$(dk $BOB info --format "$fmt" 2>"$d/err") || { fail "bob: docker info exited non-zero: $(first_line "$d/err")"; return; }
    [[ $got_a == "$want_a" ]] || { fail "alice got '$got_a', her daemon is '$want_a'"; return; }
    [[ $got_b == "$want_b" ]] || { fail "bob got '$got_b', his daemon is '$want_b'"; return; }
    [[ $want_a != "$want_b" ]] || { fail "alice and bob daemons look identical ('$want_a')"; return; }
    # The server half of `docker version` too (HEAD/GET /_ping then /version).
    local v
    v=$(dk $ALICE version --format '{{.Server.Version}}' 2>"$d/err") || { fail "docker version: $(first_line "$d/err")"; return; }
    [[ -n $v ]] || { fail "docker version printed no server version"; return; }
}

# 2. What alice creates is invisible to bob, and the other way round.
s_isolation() {
    local d=$TMP/s-iso u other tag out
    mkdir -p "$d"
    for u in $ALICE $BOB; do
        tag="$u-$RUN_ID"
        dk "$u" create --label "$LABEL=1" --label "dsr-owner=$tag" --name "dsr-iso-$tag" \
            --network none "$IMAGE" true >/dev/null 2>"$d/err" ||
            { fail "$u: docker create: $(first_line "$d/err")"; return; }
    done
    for u in $ALICE $BOB; do
        if [[ $u == "$ALICE" ]]; then other=$BOB; else other=$ALICE; fi
        tag="$u-$RUN_ID"
        out=$(dk "$u" ps -a --filter "label=dsr-owner=$tag" --format '{{.Names}}' 2>"$d/err") ||
            { fail "$u: docker ps: $(first_line "$d/err")"; return; }
        [[ $out == "dsr-iso-$tag" ]] || { fail "$u does not see her/his own container (got '$out')"; return; }
        out=$(dk "$other" ps -a --filter "label=dsr-owner=$tag" --format '{{.Names}}' 2>"$d/err") ||
            { fail "$other: docker ps: $(first_line "$d/err")"; return; }
        [[ -z $out ]] || { fail "$other sees $u's container: '$out'"; return; }
        if dk "$other" inspect "dsr-iso-$tag" >/dev/null 2>&1; then
            fail "$other can inspect $u's container dsr-iso-$tag"
            return
        fi
    done
    for u in $ALICE $BOB; do
        dk "$u" rm "dsr-iso-$u-$RUN_ID" >/dev/null 2>"$d/err" ||
            { fail "$u: docker rm: $(first_line "$d/err")"; return; }
    done
}

# 3. stdin EOF reaches the container (the router passes the client's half-close on).
# DK_BIN selects the client (the alternate client reuses this scenario).
s_stdin_eof() {
    local bin=${DK_BIN:-$DOCKER}
    local d=$TMP/s-stdin-${bin##*/}-$RANDOM out rc=0
    mkdir -p "$d"
    out=$(echo x | DK_TIMEOUT=60 dk $ALICE run -i --rm --label "$LABEL=1" --network none "$IMAGE" cat 2>"$d/err") || rc=$?
    ((rc != 124 && rc != 137)) || { fail "timed out after 60 s (stdin EOF not propagated to the container?)"; return; }
    ((rc == 0)) || { fail "docker run exited $rc: $(first_line "$d/err")"; return; }
    [[ $out == x ]] || { fail "expected 'x', got '$out'"; return; }
}

# 4. `docker exec -i` round-trips 8 MiB of random bytes.
s_exec_roundtrip() {
    local d=$TMP/s-exec name="dsr-exec-$RUN_ID" rc=0
    mkdir -p "$d"
    random_file "$d/in.bin" 8
    dk $ALICE run -d --label "$LABEL=1" --network none --name "$name" "$IMAGE" sleep 600 >/dev/null 2>"$d/err" ||
        { fail "docker run -d: $(first_line "$d/err")"; return; }
    DK_TIMEOUT=90 dk $ALICE exec -i "$name" cat <"$d/in.bin" >"$d/out.bin" 2>"$d/err" || rc=$?
    dk $ALICE rm -f "$name" >/dev/null 2>&1 || true
    ((rc != 124 && rc != 137)) || { fail "docker exec -i timed out after 90 s (got $(stat -c %s "$d/out.bin") of $((8 * MiB)) bytes)"; return; }
    ((rc == 0)) || { fail "docker exec -i exited $rc: $(first_line "$d/err")"; return; }
    local a b
    a=$(sha_of "$d/in.bin")
    b=$(sha_of "$d/out.bin")
    [[ $a == "$b" ]] || { fail "data differs: sent $((8 * MiB)) bytes sha256 $a, got $(stat -c %s "$d/out.bin") bytes sha256 $b"; return; }
}

# 5. `docker logs -f` ends by itself when the container stops, with all the output.
s_logs_follow() {
    local d=$TMP/s-logs name="dsr-logs-$RUN_ID" rc=0
    mkdir -p "$d"
    # 2000 lines at once, a pause while `logs -f` is following, then one more line and exit.
    dk $ALICE run -d --label "$LABEL=1" --network none --name "$name" "$IMAGE" \
        sh -c 'seq 1 2000; sleep 3; echo done' >/dev/null 2>"$d/err" ||
        { fail "docker run -d: $(first_line "$d/err")"; return; }
    DK_TIMEOUT=60 dk $ALICE logs -f "$name" >"$d/out" 2>"$d/err" || rc=$?
    dk $ALICE rm -f "$name" >/dev/null 2>&1 || true
    ((rc != 124 && rc != 137)) || { fail "docker logs -f did not end within 60 s after the container stopped ($(wc -l <"$d/out") lines so far)"; return; }
    ((rc == 0)) || { fail "docker logs -f exited $rc: $(first_line "$d/err")"; return; }
    local lines last
    lines=$(wc -l <"$d/out")
    last=$(tail -n 1 "$d/out")
    if ((lines != 2001)) || [[ $last != "done" ]]; then
        fail "expected 2001 lines ending with 'done', got $lines lines ending with '$last'"
        return
    fi
    seq 1 2000 | cmp -s - <(head -n 2000 "$d/out") || { fail "log lines out of order or corrupted"; return; }
}

# Wait until FILE contains a line equal to WORD, up to SECS seconds.
wait_for_line() {
    local file=$1 word=$2 secs=$3 deadline
    deadline=$((SECONDS + secs))
    until grep -qx -- "$word" "$file" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# 6. `docker events` streams events live.
s_events_stream() {
    local d=$TMP/s-events name="dsr-ev-$RUN_ID" pid
    mkdir -p "$d"
    # --since: should the client be slow to subscribe on a loaded machine, the create event is
    # replayed rather than missed. The destroy event is only produced after the create event
    # has been seen, so it can only arrive by live streaming.
    prefix_for $ALICE "$(scenario_sock $ALICE)" 60
    "${PFX[@]}" "$DOCKER" events --since "$(($(date +%s) - 1))" --filter "label=dsr-ev=$RUN_ID" \
        --format '{{.Type}} {{.Action}}' >"$d/out" 2>"$d/err" &
    pid=$!
    BG_PIDS+=("$pid")
    sleep 1
    if ! kill -0 "$pid" 2>/dev/null; then
        fail "docker events exited at once: $(first_line "$d/err")"
        return
    fi
    dk $ALICE create --label "$LABEL=1" --label "dsr-ev=$RUN_ID" --network none --name "$name" "$IMAGE" true \
        >/dev/null 2>"$d/err2" || { kill "$pid" 2>/dev/null; fail "docker create: $(first_line "$d/err2")"; return; }
    if ! wait_for_line "$d/out" "container create" 15; then
        kill "$pid" 2>/dev/null
        dk $ALICE rm -f "$name" >/dev/null 2>&1 || true
        fail "no 'container create' event within 15 s (got: $(tr '\n' ';' <"$d/out"))"
        return
    fi
    # Only now remove it: this event did not exist when `docker events` connected.
    dk $ALICE rm "$name" >/dev/null 2>"$d/err2" || { kill "$pid" 2>/dev/null; fail "docker rm: $(first_line "$d/err2")"; return; }
    if ! wait_for_line "$d/out" "container destroy" 15; then
        kill "$pid" 2>/dev/null
        fail "no 'container destroy' event within 15 s (got: $(tr '\n' ';' <"$d/out"))"
        return
    fi
    kill -0 "$pid" 2>/dev/null || { fail "docker events ended early: $(first_line "$d/err")"; return; }
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# 7. `docker save | docker load` through the router, and image IDs survive.
s_save_load() {
    local d=$TMP/s-save want got tag="dsr-saved:$RUN_ID" rc=0
    mkdir -p "$d"
    want=$(dk $ALICE image inspect --format '{{.Id}}' "$IMAGE" 2>"$d/err") || { fail "image inspect: $(first_line "$d/err")"; return; }
    # a) A straight pipe: two router connections at once, one streaming into the other.
    DK_TIMEOUT=90 dk $ALICE save "$IMAGE" 2>"$d/err-save" | DK_TIMEOUT=90 dk $ALICE load >"$d/out" 2>"$d/err-load" || rc=$?
    ((rc == 0)) || { fail "save | load exited $rc: save: $(first_line "$d/err-save") load: $(first_line "$d/err-load")"; return; }
    grep -q "Loaded image: $IMAGE" "$d/out" || { fail "docker load printed '$(first_line "$d/out")'"; return; }
    # b) Save a second tag to a file, drop the tag, load it back: the tag returns, same ID.
    dk $ALICE tag "$IMAGE" "$tag" 2>"$d/err" || { fail "docker tag: $(first_line "$d/err")"; return; }
    DK_TIMEOUT=90 dk $ALICE save -o "$TMP/out-$ALICE/img.tar" "$tag" 2>"$d/err" || { fail "docker save -o: $(first_line "$d/err")"; return; }
    dk $ALICE rmi "$tag" >/dev/null 2>"$d/err" || { fail "docker rmi: $(first_line "$d/err")"; return; }
    DK_TIMEOUT=90 dk $ALICE load -i "$TMP/out-$ALICE/img.tar" >"$d/out" 2>"$d/err" || { fail "docker load -i: $(first_line "$d/err")"; return; }
    got=$(dk $ALICE image inspect --format '{{.Id}}' "$tag" 2>"$d/err") || { fail "loaded tag missing: $(first_line "$d/err")"; return; }
    dk $ALICE rmi "$tag" >/dev/null 2>&1 || true
    [[ $got == "$want" ]] || { fail "image ID changed: $want -> $got"; return; }
}

# 8. A BuildKit build with a 16 MiB context (exercises /session and /grpc upgrades).
s_buildkit_build() {
    local d=$TMP/s-build tag="dsr-build:$RUN_ID" want got rc=0
    mkdir -p "$d/ctx"
    random_file "$d/ctx/data.bin" 16
    printf 'FROM %s\nCOPY data.bin /data.bin\n' "$IMAGE" >"$d/ctx/Dockerfile"
    chmod 0755 "$d" "$d/ctx"
    chmod 0644 "$d/ctx/Dockerfile"
    want=$(sha_of "$d/ctx/data.bin")
    # Debian's 20.10 client: BuildKit is built in (the 28.x client would need buildx).
    DK_BIN=/usr/bin/docker DK_ENV=DOCKER_BUILDKIT=1 DK_TIMEOUT=180 \
        dk $ALICE build --progress=plain -t "$tag" "$d/ctx" >"$d/out" 2>&1 || rc=$?
    ((rc != 124 && rc != 137)) || { fail "docker build timed out after 180 s; last output: $(tail -n 1 "$d/out")"; return; }
    ((rc == 0)) || { fail "docker build exited $rc: $(grep -m1 -iE 'error|failed' "$d/out" || tail -n 1 "$d/out")"; return; }
    # Make sure BuildKit (not the classic builder) did the build.
    grep -qE '^#[0-9]+ ' "$d/out" || { fail "build output does not look like BuildKit: $(first_line "$d/out")"; return; }
    got=$(dk $ALICE run --rm --label "$LABEL=1" --network none "$tag" sha256sum /data.bin 2>"$d/err") ||
        { fail "docker run of the built image: $(first_line "$d/err")"; return; }
    dk $ALICE rmi "$tag" >/dev/null 2>&1 || true
    [[ ${got%% *} == "$want" ]] || { fail "file in image has sha256 '${got%% *}', context file $want"; return; }
}

# 9. `docker cp` in and out, byte-exact.
s_cp_roundtrip() {
    local d=$TMP/s-cp name="dsr-cp-$RUN_ID" rc=0
    mkdir -p "$d"
    chmod 0755 "$d"
    random_file "$d/in.bin" 8
    dk $ALICE run -d --label "$LABEL=1" --network none --name "$name" "$IMAGE" sleep 600 >/dev/null 2>"$d/err" ||
        { fail "docker run -d: $(first_line "$d/err")"; return; }
    cp_steps "$d" "$name" || rc=$?
    dk $ALICE rm -f "$name" >/dev/null 2>&1 || true
    return "$rc"
}

# The body of scenario 9, with the container NAME running; D is its scratch directory.
cp_steps() {
    local d=$1 name=$2 want got out=$TMP/out-$ALICE
    want=$(sha_of "$d/in.bin")
    DK_TIMEOUT=90 dk $ALICE cp "$d/in.bin" "$name:/tmp/in.bin" 2>"$d/err" ||
        { fail "docker cp in: $(first_line "$d/err")"; return; }
    got=$(dk $ALICE exec "$name" sha256sum /tmp/in.bin 2>"$d/err") ||
        { fail "sha256sum in container: $(first_line "$d/err")"; return; }
    [[ ${got%% *} == "$want" ]] || { fail "copied-in file has sha256 ${got%% *}, want $want"; return; }
    rm -f "$out/cp-out.bin"
    DK_TIMEOUT=90 dk $ALICE cp "$name:/tmp/in.bin" "$out/cp-out.bin" 2>"$d/err" ||
        { fail "docker cp out: $(first_line "$d/err")"; return; }
    got=$(sha_of "$out/cp-out.bin")
    [[ $got == "$want" ]] || { fail "copied-out file has sha256 $got, want $want"; return; }
    # And as a tar stream on stdout.
    DK_TIMEOUT=90 dk $ALICE cp "$name:/tmp/in.bin" - >"$d/out.tar" 2>"$d/err" ||
        { fail "docker cp out to stdout: $(first_line "$d/err")"; return; }
    got=$(tar -xOf "$d/out.tar" in.bin | sha256sum | cut -d' ' -f1)
    [[ $got == "$want" ]] || { fail "tar stream from docker cp holds sha256 $got, want $want"; return; }
}

# 10. A user with no daemon gets a Docker-style error, fast, naming her uid or socket path.
s_no_daemon_error() {
    ((DIRECT)) && { skip "router only"; return; }
    local bin=${DK_BIN:-$DOCKER}
    local d=$TMP/s-carol-${bin##*/}-$RANDOM uid t0 ms rc=0
    mkdir -p "$d"
    uid=$(uid_of $CAROL)
    t0=$(now_ms)
    DK_TIMEOUT=20 dk $CAROL ps >"$d/out" 2>"$d/err" || rc=$?
    ms=$(($(now_ms) - t0))
    ((rc != 0)) || { fail "docker ps succeeded for a user with no daemon"; return; }
    ((rc != 124 && rc != 137)) || { fail "docker ps hung (killed after 20 s)"; return; }
    grep -q 'Error response from daemon' "$d/err" || { fail "stderr is '$(first_line "$d/err")', not 'Error response from daemon: ...'"; return; }
    grep -qE "(uid[ =]*$uid|/run/user/$uid)" "$d/err" || { fail "message does not mention uid $uid or /run/user/$uid: '$(first_line "$d/err")'"; return; }
    ((ms < 3000)) || { fail "took $ms ms (limit 3000 ms)"; return; }
    note "carol's error (${ms} ms): $(first_line "$d/err")"
}

# 11. 50 docker commands at once, alice and bob mixed; each reaches the right daemon.
s_parallel_50() {
    local d=$TMP/s-par i u kind id_a id_b
    mkdir -p "$d"
    id_a=$(dd_ $ALICE info --format '{{.ID}}' 2>/dev/null) || { fail "direct info (alice) failed"; return; }
    id_b=$(dd_ $BOB info --format '{{.ID}}' 2>/dev/null) || { fail "direct info (bob) failed"; return; }
    local -a pids=() users=() kinds=()
    for i in $(seq 0 49); do
        if ((i % 2)); then u=$BOB; else u=$ALICE; fi
        case $((i % 5)) in
            0 | 1) kind="ps" ;;
            2 | 3) kind="info" ;;
            4) kind="run" ;;
        esac
        users[i]=$u
        kinds[i]=$kind
        case $kind in
            ps) DK_TIMEOUT=120 dk "$u" ps -a >"$d/$i.out" 2>"$d/$i.err" & ;;
            info) DK_TIMEOUT=120 dk "$u" info --format '{{.ID}}' >"$d/$i.out" 2>"$d/$i.err" & ;;
            run) DK_TIMEOUT=120 dk "$u" run --rm --label "$LABEL=1" --network none "$IMAGE" echo "hello-$i" >"$d/$i.out" 2>"$d/$i.err" & ;;
        esac
        pids[i]=$!
    done
    local bad=0 msgs="" rc want
    for i in $(seq 0 49); do
        rc=0
        wait "${pids[i]}" || rc=$?
        if ((rc != 0)); then
            bad=$((bad + 1))
            msgs+=" #$i(${users[i]} ${kinds[i]}) exit $rc: $(first_line "$d/$i.err");"
            continue
        fi
        case ${kinds[i]} in
            info)
                if [[ ${users[i]} == "$ALICE" ]]; then want=$id_a; else want=$id_b; fi
                if [[ $(cat "$d/$i.out") != "$want" ]]; then
                    bad=$((bad + 1))
                    msgs+=" #$i(${users[i]} info) reached daemon $(cat "$d/$i.out");"
                fi
                ;;
            run)
                if [[ $(cat "$d/$i.out") != "hello-$i" ]]; then
                    bad=$((bad + 1))
                    msgs+=" #$i(${users[i]} run) printed '$(first_line "$d/$i.out")';"
                fi
                ;;
        esac
    done
    ((bad == 0)) || { fail "$bad of 50 failed:${msgs:0:600}"; return; }
}

# Extra: a user whose daemon stops gets the refusal; once it is back, the very next connection
# is served (nothing cached between connections, DESIGN.md).
s_daemon_restart() {
    ((DIRECT)) && { skip "router only"; return; }
    [[ -n ${DAEMON_LEADER[$BOB]:-} ]] || { skip "$BOB's daemon was not started by this script"; return; }
    local d=$TMP/s-restart rc=0 want got
    mkdir -p "$d"
    want=$(dd_ $BOB info --format '{{.ID}}' 2>/dev/null) || { fail "direct info (bob) failed"; return; }
    stop_daemon $BOB
    DK_TIMEOUT=20 dk $BOB ps >/dev/null 2>"$d/err" || rc=$?
    ((rc != 0)) || { fail "docker ps succeeded with $BOB's daemon stopped"; return; }
    grep -q 'Error response from daemon' "$d/err" ||
        { fail "with the daemon stopped, stderr is '$(first_line "$d/err")'"; return; }
    start_daemon $BOB
    wait_daemon $BOB || { fail "$BOB's daemon did not come back"; return; }
    got=$(dk $BOB info --format '{{.ID}}' 2>"$d/err") ||
        { fail "after the restart, docker info: $(first_line "$d/err")"; return; }
    [[ $got == "$want" ]] || { fail "after the restart, $BOB reached daemon '$got', want '$want'"; return; }
}

# Extra: on SIGTERM the router stops accepting (removes its socket), lets a live connection
# finish, then exits 0 (DESIGN.md, Lifecycle). The live connection is a single `curl` following
# the logs of a container that prints one more line 4 s later.
s_router_sigterm() {
    ((DIRECT)) && { skip "router only"; return; }
    local d=$TMP/s-sigterm name="dsr-term-$RUN_ID" pid rc=0 deadline
    mkdir -p "$d"
    dk $ALICE run -d --label "$LABEL=1" --network none --name "$name" "$IMAGE" \
        sh -c 'echo first; sleep 4; echo last' >/dev/null 2>"$d/err" ||
        { fail "docker run -d: $(first_line "$d/err")"; return; }
    prefix_for $ALICE "$ROUTER_SOCK" 40
    "${PFX[@]}" curl -sS --no-buffer --unix-socket "$ROUTER_SOCK" \
        "http://localhost/containers/$name/logs?follow=1&stdout=1" >"$d/out" 2>"$d/err" &
    pid=$!
    BG_PIDS+=("$pid")
    deadline=$((SECONDS + 10))
    until grep -aq first "$d/out"; do
        if ((SECONDS >= deadline)) || ! kill -0 "$pid" 2>/dev/null; then
            fail "curl did not get the first log line: $(first_line "$d/err")"
            return
        fi
        sleep 0.1
    done
    kill -TERM "$ROUTER_PID" 2>/dev/null || { fail "router was not running"; return; }
    # The socket goes away at once; the live stream keeps flowing until the container exits.
    deadline=$((SECONDS + 3))
    while [[ -e $ROUTER_SOCK ]] && ((SECONDS < deadline)); do sleep 0.1; done
    [[ ! -e $ROUTER_SOCK ]] || { fail "socket $ROUTER_SOCK still exists 3 s after SIGTERM"; return; }
    wait "$pid" || rc=$?
    ((rc == 0)) || { fail "the live logs stream ended with curl status $rc: $(first_line "$d/err")"; return; }
    grep -aq last "$d/out" || { fail "the live logs stream was cut off by the shutdown (no 'last' line)"; return; }
    if ! wait_gone 15 "$ROUTER_PID"; then
        fail "router still running 15 s after SIGTERM"
        return
    fi
    rc=0
    wait "$ROUTER_PID" || rc=$?
    ROUTER_PID=""
    ((rc == 0)) || { fail "router exited with status $rc after SIGTERM"; return; }
    DK_TIMEOUT=30 dd_ $ALICE rm -f "$name" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
REASON_FILE=$TMP/reason

((DIRECT)) || ensure_router_binary
start_daemon $ALICE
start_daemon $BOB
wait_daemon $ALICE || die "rootless dockerd of $ALICE did not answer within ${DAEMON_START_TIMEOUT}s"
wait_daemon $BOB || die "rootless dockerd of $BOB did not answer within ${DAEMON_START_TIMEOUT}s"
# carol must really have no daemon, or scenario 10 means nothing.
if DK_TIMEOUT=10 dd_ $CAROL version >/dev/null 2>&1; then
    die "a daemon answers on $(daemon_sock $CAROL); $CAROL must not have one"
fi
note "daemons up after $((SECONDS - T_START)) s"

purge_leftovers $ALICE
purge_leftovers $BOB
make_rootfs_tar
import_image $ALICE
import_image $BOB

if ((DIRECT)); then
    note "--direct: talking to the daemons' own sockets, no router"
else
    start_router
    mode=$(stat -c %a "$ROUTER_SOCK")
    [[ $mode == 666 ]] || note "warning: router socket mode is $mode, expected 666"
fi
note "scenarios start after $((SECONDS - T_START)) s; client $DOCKER ($("$DOCKER" --version))"

scenario info-own-daemon s_info_own_daemon
scenario isolation s_isolation
scenario stdin-eof s_stdin_eof
scenario exec-8MiB-roundtrip s_exec_roundtrip
scenario logs-follow-ends s_logs_follow
scenario events-stream s_events_stream
scenario save-load s_save_load
scenario buildkit-build-16MiB s_buildkit_build
scenario cp-in-out-8MiB s_cp_roundtrip
scenario no-daemon-error s_no_daemon_error
scenario parallel-50 s_parallel_50
if [[ -n $DOCKER_ALT ]]; then
    note "alternate client $DOCKER_ALT ($("$DOCKER_ALT" --version))"
    DK_BIN=$DOCKER_ALT scenario alt-client-info-own-daemon s_info_own_daemon
    DK_BIN=$DOCKER_ALT scenario alt-client-stdin-eof s_stdin_eof
    DK_BIN=$DOCKER_ALT scenario alt-client-no-daemon-error s_no_daemon_error
fi
scenario daemon-restart s_daemon_restart
scenario router-sigterm s_router_sigterm

note "total $((SECONDS - T_START)) s"
((SKIPPED == 0)) || echo "$SKIPPED skipped"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
