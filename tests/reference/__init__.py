"""Independent float64 oracles for the test suite (no imports from ``singd``)."""
