"""Tools built on the library: benchmark, evaluation, the demo job, the tile figure."""
