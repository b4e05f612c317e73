"""Data sources: real data sets that install from package registries and load offline."""
