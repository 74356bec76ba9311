#!/usr/bin/env bash
# Installs audiodrop as a system service in one command, from a checkout:
#   sudo make install-service [KEY_FILE=/path/to/key]      (or: sudo bash systemd/install.sh [--key-file PATH])
#   - the code goes to $PREFIX (default /opt/audiodrop) with its own .venv (ffmpeg from apt)
#   - a system user "audiodrop"; config in /etc/audiodrop/config.toml (an example the first time)
#   - the API key into /etc/audiodrop/gemini-api-key (root:root 0600, read by systemd through LoadCredential and
#     handed to the service only), from KEY_FILE, else typed at the prompt when run at a terminal, else kept
#     (an empty file the first time: the service converts and queues until a key is installed). Never from
#     GEMINI_API_KEY=... on the command line: that shows in `ps` and the shell's history.
#   - a drop-in giving the service write access where its config says it writes (systemd/dropin.py), the
#     missing drop folders made safely (systemd/safe_mkdir.py); then enable and (re)start the service.
#
# For tests: `source systemd/install.sh` only defines the functions. install_config, install_key, install_units
# and create_folders write every /etc path under $AUDIODROP_INSTALL_ROOT (default: the real /), and new folders
# belong to $AUDIODROP_SERVICE_USER:$AUDIODROP_SERVICE_GROUP (default audiodrop:audiodrop).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(cd "$HERE/.." && pwd)
PREFIX=${PREFIX:-/opt/audiodrop}
# The service runs as its own user, so its Python must be the system's, not one in a person's home (pyenv).
PYTHON=${PYTHON:-/usr/bin/python3}
ROOT=${AUDIODROP_INSTALL_ROOT:-}
SERVICE_USER=${AUDIODROP_SERVICE_USER:-audiodrop}
SERVICE_GROUP=${AUDIODROP_SERVICE_GROUP:-$SERVICE_USER}
ETC=$ROOT/etc/audiodrop
UNIT_DIR=$ROOT/etc/systemd/system
KEY_FILE=${KEY_FILE:-}

die() { echo "install.sh: $*" >&2; exit 1; }

# The audiodrop user's home: ~ and $HOME in the config mean it for the service, not root's.
service_home() {
    local home
    home=$(getent passwd "$SERVICE_USER" | cut -d: -f6) || true
    echo "${home:-/var/lib/audiodrop}"
}

install_config() {
    install -d -m 0750 -g "$SERVICE_GROUP" "$ETC"
    [ -f "$ETC/config.toml" ] || install -m 0640 -g "$SERVICE_GROUP" "$HERE/config.example.toml" "$ETC/config.toml"
}

install_key() {
    if [ -n "${GEMINI_API_KEY:-}${GOOGLE_API_KEY:-}" ]; then
        echo "install.sh: GEMINI_API_KEY/GOOGLE_API_KEY in the environment is ignored: a key given on the command" \
             "line shows in ps and the shell's history. Use: sudo make install-service KEY_FILE=/path/to/key" >&2
    fi
    env -u GEMINI_API_KEY -u GOOGLE_API_KEY "$PYTHON" "$HERE/install_key.py" --dest "$ETC/gemini-api-key" \
        ${KEY_FILE:+--key-file "$KEY_FILE"}
}

install_units() {
    [[ $PREFIX =~ ^/[A-Za-z0-9._+/-]*$ ]] || die "PREFIX=$PREFIX: use a path of letters, digits and . _ + - /"
    mkdir -p "$UNIT_DIR/audiodrop.service.d"
    # The unit names /opt/audiodrop; a different PREFIX is written into the installed copy.
    sed "s|/opt/audiodrop|$PREFIX|g" "$HERE/audiodrop.service" > "$UNIT_DIR/.audiodrop.service.tmp"
    chmod 0644 "$UNIT_DIR/.audiodrop.service.tmp"
    mv -f "$UNIT_DIR/.audiodrop.service.tmp" "$UNIT_DIR/audiodrop.service"
    "$PYTHON" "$HERE/dropin.py" render --config "$ETC/config.toml" --home "$(service_home)" --user "$SERVICE_USER" \
        --output "$UNIT_DIR/audiodrop.service.d/drop-folders.conf"
}

# A drop folder that does not exist yet is made, writable by the audiodrop group (add people who drop files to
# it: usermod -aG audiodrop NAME); state_dir/results_dir outside /var/lib/audiodrop are made for the service,
# which cannot make them itself under ProtectSystem=strict. safe_mkdir.py refuses a path through a symlink that
# is not root's and never re-owns what exists.
create_folders() {
    local listing kind path drops=() data=()
    listing=$("$PYTHON" "$HERE/dropin.py" folders --config "$ETC/config.toml" --home "$(service_home)" \
              --user "$SERVICE_USER")
    while IFS=$'\t' read -r kind path; do
        case $kind in
            drop) drops+=("$path") ;;
            data) data+=("$path") ;;
        esac
    done <<< "$listing"
    local status=0
    if [ ${#data[@]} -gt 0 ]; then
        "$PYTHON" "$HERE/safe_mkdir.py" --owner "$SERVICE_USER" --group "$SERVICE_GROUP" --mode 0750 \
            -- "${data[@]}" || status=1
    fi
    if [ ${#drops[@]} -gt 0 ]; then
        "$PYTHON" "$HERE/safe_mkdir.py" --owner "$SERVICE_USER" --group "$SERVICE_GROUP" --mode 2770 \
            -- "${drops[@]}" || status=1
    fi
    [ $status = 0 ] || die "some folders were refused (above); fix them in $ETC/config.toml or on disk, then run again"
}

main() {
    while [ $# -gt 0 ]; do
        case $1 in
            --key-file) [ $# -ge 2 ] || die "--key-file needs a path"; KEY_FILE=$2; shift 2 ;;
            --key-file=*) KEY_FILE=${1#--key-file=}; shift ;;
            *) die "unknown argument $1 (usage: install.sh [--key-file PATH])" ;;
        esac
    done
    [ "$(id -u)" = 0 ] || die "run as root (sudo make install-service)"
    [ -z "$KEY_FILE" ] || [ "$KEY_FILE" = - ] || [ -r "$KEY_FILE" ] || die "KEY_FILE=$KEY_FILE cannot be read"

    id "$SERVICE_USER" >/dev/null 2>&1 ||
        useradd --system --home-dir /var/lib/audiodrop --shell /usr/sbin/nologin "$SERVICE_USER"

    if [ "$SOURCE" != "$PREFIX" ]; then
        mkdir -p "$PREFIX"
        (cd "$SOURCE" && git ls-files -z 2>/dev/null || find . -path ./.venv -prune -o -type f -print0) |
            (cd "$SOURCE" && xargs -0 cp --parents -t "$PREFIX")
    fi
    if [ -e "$PREFIX/.venv" ] && [ "$(readlink -f "$PREFIX/.venv/bin/python3")" != "$(readlink -f "$PYTHON")" ]; then
        rm -rf "$PREFIX/.venv"
    fi
    make -C "$PREFIX" setup PYTHON="$PYTHON"

    install_config
    # A config the daemon refuses would only show as a unit that fails to start: say it now.
    (cd "$PREFIX" && .venv/bin/python -c '
import sys
from daemon.config import load_settings
try:
    load_settings(sys.argv[1])
except Exception as err:
    sys.exit(f"install.sh: {err}")' "$ETC/config.toml")
    install_key
    install_units
    create_folders

    systemctl daemon-reload
    systemctl enable audiodrop
    # Restart, not only start: a running service gets the new drop-in; reset-failed clears an earlier start limit.
    systemctl reset-failed audiodrop 2>/dev/null || true
    systemctl restart audiodrop
    echo "audiodrop is installed: systemctl status audiodrop;" \
         "$PREFIX/.venv/bin/audiodrop status --config /etc/audiodrop/config.toml"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
