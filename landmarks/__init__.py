"""Facial Action Unit region definitions (data), installed as ``interp_fer.landmarks``.

This folder holds reviewed data, not code: see ``README.md`` beside this file.
"""
