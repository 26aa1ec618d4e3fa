"""A procedural picture world with known truth, and the small models trained on it."""
