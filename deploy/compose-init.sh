#!/bin/sh
# Compose's init step (deploy/compose.yaml): a demo federation for the nodes on the bridge network.
# Creates the federation once, then for each node that has no certificate yet: its keys, its
# certificate (p2pfl federation issue) and its node.toml. Safe to run again: what exists is kept.
# In production the admin issues certificates offline instead (docs/deploy.md), and each node
# creates its own keys.
set -eu
NODES="${P2PFL_NODES:?set P2PFL_NODES, e.g. '1 2 3'}"
SUBNET_PREFIX="${P2PFL_SUBNET_PREFIX:-172.28.0}"
COUNT=$(echo $NODES | wc -w)

if [ ! -f /federation/root.key ]; then
  p2pfl federation init --dir /federation
fi
for n in $NODES; do
  dir="/nodes/node-$n"
  if [ ! -f "$dir/certificate" ]; then
    p2pfl federation issue "node-$n" --dir /federation --node-dir "$dir"
  fi
  if [ ! -f "$dir/node.toml" ]; then
    address="$SUBNET_PREFIX.$((10 + n))"
    cat > "$dir/node.toml" <<TOML
# written by deploy/compose-init.sh; edit it in the node's volume, then restart the node
[node]
data_dir = "."  # this file's folder: the node's volume
host = "$address"  # the container's fixed address on the bridge network
port = 18830

[discovery]
interfaces = ["$address"]  # mDNS on the bridge only
expect_peers = $((COUNT - 1))
wait_s = 300.0

[task]
name = "${P2PFL_TASK:-digits-mlp}"
shard = $((n - 1))
num_shards = $COUNT

[training]
rounds = ${P2PFL_ROUNDS:-30}

[gossip]
topology = "${P2PFL_TOPOLOGY:-ring}"
TOML
  fi
done
chown -R 10001:10001 /nodes    # the image's p2pfl user
chmod 0700 /nodes/node-*
echo "federation ready for nodes: $NODES"
