"""PLDB: last-value replay of PsEPR attribute events."""
