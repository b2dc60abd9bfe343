"""What a calibration npz holds besides the family's sample arrays: the contract between the calibration_data stage
(writes it) and the quantize recipes (read it), in a module of its own so neither stage's cache key depends on the
other's code."""

ROW_LENGTHS = "row_lengths"
"""In a calibration npz of one real input per row: each row's own length along the shape axis (the rest is pad)."""
