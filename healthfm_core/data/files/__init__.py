"""A site's files as untrusted input: the on-disk layout, which files belong to a site, parquet
footers checked before reading, MEDS tables aligned as MEDS allows them, reading one part ahead.
The lowest room of data/: it imports no other."""
