"""CPU speed: the chunked conv stack with its custom VJP, and the per-machine choice of XLA CPU
conv backend and forward mode (measured once, cached)."""
