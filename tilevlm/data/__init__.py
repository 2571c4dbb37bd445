"""Data: raw samples from the built-in synthetic set (synthetic) and local datasets (readers/),
their lengths, packing, the streams and collation that make training batches (TrainBatch)."""
