"""YAML training and evaluation recipes, shipped as package data (see `vlm-adapters recipes`)."""
