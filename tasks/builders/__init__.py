"""What the stages build, without the stage plumbing: export, graph surgery, calibration arrays, quantization.

Each function reads files and writes into a given path or folder; the stage modules add the atomic output
folder, the stamp and the cache key. The latency-curve stage builds artifacts at extra lengths with the
same functions, so nothing is written twice and no stage imports another.
"""
