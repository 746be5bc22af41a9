"""The slice manager: slice specs (the dslice XML) and, later, tickets → leases → slivers across many nodes."""
