"""Headless use: the example workflow as data, and the command that runs it through ComfyUI."""
