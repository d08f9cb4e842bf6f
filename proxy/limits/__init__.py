"""Per-team limits and the ledger: admission, settlement, leases, the two stores."""
