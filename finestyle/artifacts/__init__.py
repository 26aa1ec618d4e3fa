"""The formats the stages hand each other: the dataset, the adapter folder, the export manifest.

Imports core and config only.
"""
