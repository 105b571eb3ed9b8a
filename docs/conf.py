"""Sphinx configuration: the Markdown pages in this folder, built with warnings as errors in CI.

Build: ``python -m sphinx -W --keep-going -b html docs /tmp/ia3fx-docs``.
"""

project = "ia3fx"
author = "ia3fx developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
html_theme = "alabaster"
