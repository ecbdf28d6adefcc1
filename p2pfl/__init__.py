"""p2pfl: fully decentralized peer-to-peer learning over per-node MQTT brokers."""

__version__ = "0.1.0"
