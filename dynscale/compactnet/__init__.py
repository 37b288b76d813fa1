"""CompactNet: platform-aware trimming driven by a measured latency table (paper 004)."""
