#!/usr/bin/env bash
# setup-host.sh: prepare a fresh Debian 12 machine for the real-Docker end-to-end tests.
#
# Run as root. Idempotent: every step checks before it changes anything, so running it
# twice is harmless. What it does:
#   1. installs the Debian packages (docker.io, rootlesskit, uidmap, ...) unless present;
#   2. installs dockerd-rootless.sh (shipped only as an example) into /usr/local/bin;
#   3. makes /dev/net/tun usable by ordinary users (rootlesskit's network needs it);
#   4. creates the test users with subordinate uid/gid ranges and /run/user/<uid>.
#
# It never starts a daemon and never touches /var/run/docker.sock.
# Users it creates are left in place (tests/e2e/real-docker.sh relies on them).
#
# Environment:
#   DSR_E2E_USERS   space-separated user names (default: "dsr-alice dsr-bob dsr-carol")
set -euo pipefail

USERS=${DSR_E2E_USERS:-"dsr-alice dsr-bob dsr-carol"}
PACKAGES=(docker.io rootlesskit uidmap slirp4netns busybox-static socat curl python3)
ROOTLESS_SRC=/usr/share/docker.io/contrib/dockerd-rootless.sh
ROOTLESS_DST=/usr/local/bin/dockerd-rootless.sh
SUB_COUNT=65536

log() { printf 'setup-host: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

# --- 1. packages -------------------------------------------------------------------------
# True when dpkg reports the package as fully installed.
installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    apt-get update -qq
    # Installing docker.io does not start a daemon on these machines (no systemd as init);
    # policy-rc.d makes sure of it on machines where invoke-rc.d would otherwise try.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    if ((policy_created)); then rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || die "apt-get install failed (exit $rc)"
else
    log "packages already installed"
fi

# --- 2. dockerd-rootless.sh -----------------------------------------------------------------
[[ -f $ROOTLESS_SRC ]] || die "$ROOTLESS_SRC not found (docker.io package layout changed?)"
if ! cmp -s "$ROOTLESS_SRC" "$ROOTLESS_DST"; then
    log "installing $ROOTLESS_DST"
fi
install -m 0755 "$ROOTLESS_SRC" "$ROOTLESS_DST"

# --- 3. /dev/net/tun ------------------------------------------------------------------------
# rootlesskit (slirp4netns) opens it as the user; it is 0600 root on these machines.
if [[ ! -c /dev/net/tun ]]; then
    mkdir -p /dev/net
    mknod -m 666 /dev/net/tun c 10 200
fi
chmod 666 /dev/net/tun

# Kernels with the Debian-specific switch need it on for unprivileged user namespaces.
if [[ -w /proc/sys/kernel/unprivileged_userns_clone ]]; then
    echo 1 >/proc/sys/kernel/unprivileged_userns_clone
fi

# --- 4. users -------------------------------------------------------------------------------
touch /etc/subuid /etc/subgid

# Print the first start of a free range of SUB_COUNT ids in the given subid file: past the end
# of every existing range, and never below 100000.
next_free_range() {
    awk -F: -v min=100000 '
        { end = $2 + $3; if (end > min) min = end }
        END { print min }' "$1"
}

for u in $USERS; do
    if ! getent passwd "$u" >/dev/null; then
        log "creating user $u"
        useradd -m -s /bin/bash "$u"
    fi
    # useradd normally allocates subordinate ranges; add them when it did not (or for users
    # created before /etc/subuid existed).
    if ! grep -q "^$u:" /etc/subuid; then
        start=$(next_free_range /etc/subuid)
        usermod --add-subuids "$start-$((start + SUB_COUNT - 1))" "$u"
    fi
    if ! grep -q "^$u:" /etc/subgid; then
        start=$(next_free_range /etc/subgid)
        usermod --add-subgids "$start-$((start + SUB_COUNT - 1))" "$u"
    fi
    uid=$(id -u "$u")
    home=$(getent passwd "$u" | cut -d: -f6)
    [[ -d $home ]] || install -d -m 0750 -o "$u" -g "$(id -g "$u")" "$home"
    # No login session creates the runtime dir on these machines.
    install -d -m 0700 -o "$u" -g "$(id -g "$u")" "/run/user/$uid"
    chown "$u:$(id -g "$u")" "/run/user/$uid"
    chmod 0700 "/run/user/$uid"
done

log "ok"
