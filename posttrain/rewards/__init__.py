"""Rule-based rewards for ``--reward-function`` (each module documents its callable and its scores)."""
