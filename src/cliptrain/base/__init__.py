"""The bottom layer, imported by every other: the typed run config and its helpers, precision (autocast, dtypes),
ranks and collectives (World, gather), shared constants and optional imports. It imports no other layer."""
