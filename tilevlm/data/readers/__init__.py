"""Dataset readers: parquet (The Cauldron / FineVision style), `save_to_disk` directories and
LLaVA JSON, on the shared row reader (rows.py); `dataset.open_dataset` picks one for a path."""
