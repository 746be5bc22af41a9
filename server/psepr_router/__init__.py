"""The PsEPR router as a daemon (``twistd psepr-router``): where the router, its accounts and the manageability port are put together."""
