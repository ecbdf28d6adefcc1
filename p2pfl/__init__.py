"""p2pfl: fully decentralized peer-to-peer learning over per-node MQTT brokers."""

__all__ = [
    "__version__",
]

__version__ = "0.1.0"
