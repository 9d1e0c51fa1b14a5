"""The config publisher: turns plans into per-node desired configs (KV) and node labels; it never plans."""
