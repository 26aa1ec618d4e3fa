"""`finestyle eval`: style fidelity, prompt fidelity and content leakage of a style adapter."""
