"""Checkpoint conversion: diffusers folders and Black Forest Labs single files -> native fluxjax."""
