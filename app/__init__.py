"""The front door: the `lte-fed` command and its helpers, wiring lte_fed, strategies and clients."""
