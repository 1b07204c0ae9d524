"""Test and benchmark helpers: model generation, process control, raw HTTP."""
