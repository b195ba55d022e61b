"""Kernels, each beside its pure-torch reference. GPU kernels import their toolchain lazily."""
