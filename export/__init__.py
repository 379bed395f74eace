"""sd-workbench export stage (see DESIGN.md)."""
