"""Data a run reads that no stage produces: text sources and evaluation sets, with their readers and metrics."""
