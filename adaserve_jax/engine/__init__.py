"""Host wrapper around the device steps (batches and bookkeeping in numpy)."""
