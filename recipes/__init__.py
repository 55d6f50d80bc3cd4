"""Recipes: one module per dataset (and two for users' own data), each registered by name so
``flows train NAME`` runs it. ``recipes.synthetic`` writes small synthetic copies of the data."""

from recipes import folder, sousa, synthetic, table, tensor_folder, urbansound8k, yesno

__all__ = ["folder", "sousa", "synthetic", "table", "tensor_folder", "urbansound8k", "yesno"]
