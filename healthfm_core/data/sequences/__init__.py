"""A site's rows as the model reads them: the shared vocabulary from code statistics, the
token settings, the CSR sequences built shard by shard, wearable patches, and the `Batch`.
Imports data/files/ only."""
