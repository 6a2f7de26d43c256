#!/bin/sh
# Install the Debian packages `make` needs when a command they provide is missing:
#   tools/system-packages.sh venv    python3-venv (Debian's python3 has no venv module without it)
#   tools/system-packages.sh test    what the tests run: curl, openssl, ip (iproute2), kubectl
# Nothing is installed when everything is there. Needs root (or sudo) only then.
set -eu

need() {  # need COMMAND PACKAGE: add PACKAGE when COMMAND is missing
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}

missing=""
case "${1:-}" in
    venv)
        "${PYTHON:-python3}" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing=" python3-venv"
        ;;
    test)
        need curl curl
        need openssl openssl
        need ip iproute2
        need kubectl kubernetes-client
        ;;
    *)
        echo "usage: $0 venv|test" >&2
        exit 2
        ;;
esac
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "turnout: these Debian packages are needed and missing:$missing; install them as root (apt-get install$missing)" >&2
    exit 1
fi
echo "turnout: installing Debian packages:$missing" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2 || {
    $sudo apt-get update -q >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2
}
