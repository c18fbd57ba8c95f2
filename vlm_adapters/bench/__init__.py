"""Benchmarks: the adapters' effect on a synthetic fine-detail world, and their cost."""
