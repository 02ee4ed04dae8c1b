"""Deep Language Networks (DLN-1, DLN-2) in-process on shared-prefix scoring (SPEC §7)."""
