"""What several test modules share: builders of site tables and batches, in-process grids, deployed
processes and their fixtures. No test lives here; test modules import these, never each other."""
