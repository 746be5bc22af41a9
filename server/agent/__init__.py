"""The agent: advertises nodes and their capacity, and issues signed tickets for slice specs."""
