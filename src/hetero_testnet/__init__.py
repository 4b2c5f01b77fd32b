"""hetero-testnet: heterogeneous MatFormer-tier training on a local testnet."""

__version__ = "0.1.0"
