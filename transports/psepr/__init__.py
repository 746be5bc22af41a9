"""PsEPR, the publish/subscribe event service: events, channels, leases, router, client."""
