"""Data: dataset adapters, synthetic data, packing, splits and streaming."""
