"""Recipes: one file per CLI verb of the `lm` group, plus what they share."""
