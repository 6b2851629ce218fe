"""The example participants; run one with ``sagactl worker inventory``."""
