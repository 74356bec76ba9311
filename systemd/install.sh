#!/usr/bin/env bash
# Installs audiodrop as a system service in one command, from a checkout: sudo make install-service
#   - the code goes to $PREFIX (default /opt/audiodrop) with its own .venv (ffmpeg from apt)
#   - a system user "audiodrop"; config in /etc/audiodrop/config.toml (an example the first time)
#   - the API key from $GEMINI_API_KEY (if set) into /etc/audiodrop/gemini-api-key, mode 0600, read by systemd
#     (LoadCredential) and handed to the service only; never to the config or the logs
#   - a drop-in giving the service write access to the configured drop folders; then enable --now
set -euo pipefail
PREFIX=${PREFIX:-/opt/audiodrop}
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo make install-service)" >&2; exit 1; }

id audiodrop >/dev/null 2>&1 || useradd --system --home-dir /var/lib/audiodrop --shell /usr/sbin/nologin audiodrop

if [ "$SOURCE" != "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    (cd "$SOURCE" && git ls-files -z 2>/dev/null || find . -path ./.venv -prune -o -type f -print0) |
        (cd "$SOURCE" && xargs -0 cp --parents -t "$PREFIX")
fi
# The service runs as its own user, so its Python must be the system's, not one in a person's home (pyenv).
PYTHON=${PYTHON:-/usr/bin/python3}
if [ -e "$PREFIX/.venv" ] && [ "$(readlink -f "$PREFIX/.venv/bin/python3")" != "$(readlink -f "$PYTHON")" ]; then
    rm -rf "$PREFIX/.venv"
fi
make -C "$PREFIX" setup PYTHON="$PYTHON"

install -d -m 0750 -g audiodrop /etc/audiodrop
[ -f /etc/audiodrop/config.toml ] || install -m 0640 -g audiodrop "$PREFIX/systemd/config.example.toml" /etc/audiodrop/config.toml
if [ -n "${GEMINI_API_KEY:-}" ]; then
    (umask 077; printf '%s' "$GEMINI_API_KEY" > /etc/audiodrop/gemini-api-key)
elif [ ! -f /etc/audiodrop/gemini-api-key ]; then
    # An empty key file: the service starts, converts and waits, and `audiodrop status` says it needs a key.
    (umask 077; : > /etc/audiodrop/gemini-api-key)
fi

# The unit names /opt/audiodrop; a different PREFIX is written into the installed copy.
sed "s|/opt/audiodrop|$PREFIX|g" "$PREFIX/systemd/audiodrop.service" > /etc/systemd/system/audiodrop.service
chmod 0644 /etc/systemd/system/audiodrop.service
mkdir -p /etc/systemd/system/audiodrop.service.d
{
    echo "# Written by install.sh from /etc/audiodrop/config.toml: the drop folders the service may use."
    echo "[Service]"
    "$PREFIX/.venv/bin/python" -c '
from daemon.config import load_settings
for watch in load_settings("/etc/audiodrop/config.toml").watches:
    print(f"ReadWritePaths=-{watch.path}")'
} > /etc/systemd/system/audiodrop.service.d/drop-folders.conf
# A drop folder that does not exist yet is made, writable by the audiodrop group (add people who drop files
# to it: usermod -aG audiodrop NAME); the service cannot create it itself under ProtectSystem=strict.
sed -n 's/^ReadWritePaths=-//p' /etc/systemd/system/audiodrop.service.d/drop-folders.conf | while read -r folder; do
    [ -d "$folder" ] || install -d -o audiodrop -g audiodrop -m 2770 "$folder"
done

systemctl daemon-reload
systemctl enable --now audiodrop
echo "audiodrop is installed: systemctl status audiodrop; $PREFIX/.venv/bin/audiodrop status --config /etc/audiodrop/config.toml"
