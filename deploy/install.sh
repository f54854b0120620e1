#!/usr/bin/env bash
# Install the CXR node as systemd services on a Debian/Ubuntu host (run as root from the
# repository root):  deploy/install.sh [node|worker|both]   (default: node)
# - code and virtualenv in /opt/cxr-node, data in /var/lib/cxr-node, settings in /etc/cxr-node
# - "node" also installs Redis with deploy/redis/cxr-redis.conf (used when CXR_BROKER_URL is set)
set -euo pipefail
role=${1:-node}
prefix=/opt/cxr-node

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv rsync
id cxr >/dev/null 2>&1 || useradd --system --home-dir /var/lib/cxr-node --shell /usr/sbin/nologin cxr
install -d -o cxr -g cxr -m 0750 /var/lib/cxr-node
install -d -m 0755 /etc/cxr-node "$prefix"

rsync -a --delete --exclude .git --exclude .venv --exclude var ./ "$prefix"/
python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install -q --upgrade pip
"$prefix/.venv/bin/pip" install -q "$prefix"

install -m 0644 deploy/systemd/cxr-node.service deploy/systemd/cxr-worker@.service /etc/systemd/system/
install -m 0644 deploy/logrotate/cxr-node /etc/logrotate.d/cxr-node
if [ "$role" = node ] || [ "$role" = both ]; then
  [ -f /etc/cxr-node/node.env ] || install -m 0640 deploy/examples/single-host.env /etc/cxr-node/node.env
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
  install -m 0644 deploy/redis/cxr-redis.conf /etc/cxr-node/cxr-redis.conf
  install -m 0644 deploy/systemd/cxr-redis.service /etc/systemd/system/
  install -m 0644 deploy/systemd/cxr-cleanup.service deploy/systemd/cxr-cleanup.timer /etc/systemd/system/
fi
if [ "$role" = worker ] || [ "$role" = both ]; then
  [ -f /etc/cxr-node/worker.env ] || install -m 0640 deploy/examples/worker.env /etc/cxr-node/worker.env
fi
systemctl daemon-reload
echo "Installed. Edit /etc/cxr-node/*.env, then:"
echo "  systemctl enable --now cxr-node          # node host (add cxr-redis with a broker URL)"
echo "  systemctl enable --now cxr-cleanup.timer  # node host: daily cxr-node cleanup (CXR_RETENTION_DAYS)"
echo "  systemctl enable --now cxr-worker@8081   # each inference worker process (name = its HTTP port)"
