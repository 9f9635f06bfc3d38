"""Opening a checked site for reading (`open_site`, `Site`), and a run's on-disk cache of its sites.
The top room of data/: it may import every other."""
