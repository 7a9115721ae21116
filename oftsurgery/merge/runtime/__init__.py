"""How the merge's work runs: the writer thread, host/GPU transfers, ranks, shards and failures."""
