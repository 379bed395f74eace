"""sd-workbench bench stage (see DESIGN.md)."""
