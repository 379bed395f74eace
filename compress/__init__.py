"""sd-workbench compress stage (see DESIGN.md)."""
