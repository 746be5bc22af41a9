"""How envelopes and events move: PsEPR events, the SOAP core and its transports.

Knows nothing of slices or deployments (see DESIGN.md, layer rule)."""
